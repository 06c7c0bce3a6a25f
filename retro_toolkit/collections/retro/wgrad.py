"""Weight gradients accumulated straight into megatron-core DDP's grad buffer.

With `gradient_accumulation_fusion`, megatron-core's linear layers give the weight
gradient GEMM the DDP buffer (`weight.main_grad`) to accumulate into. Without it, each
layer returns a fresh weight gradient that a backward hook then adds to the buffer: one
more pass over every weight gradient per micro-batch, and a gradient-sized allocation.
megatron-core takes the GEMM from apex's CUDA extension `fused_weight_gradient_mlp_cuda`;
where apex is absent (CPU, plain PyTorch images) `install()` gives it the same two
functions written in torch, so the option works on any device.

Only for models wrapped in megatron-core DDP (the layers need `main_grad`): the training
stages turn it on through `training.precision_overrides`.
"""

from __future__ import annotations

import sys

import torch


def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """main_grad += grad_output^T @ total_input into an fp32 main_grad ([out, in]); the activations
    ([tokens, in], [tokens, out]) are fp32, or bf16/fp16 under mixed precision, as apex accepts.

    16-bit inputs are widened first (exactly): the product is then summed in fp32, as apex's
    kernel does, rather than rounded to 16 bits before it reaches the buffer.
    """
    if total_input.dtype != main_grad.dtype:
        total_input, grad_output = total_input.to(main_grad.dtype), grad_output.to(main_grad.dtype)
    main_grad.addmm_(grad_output.t(), total_input)


def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """The same for bf16/fp16 activations and an fp32 main_grad."""
    main_grad.add_(grad_output.t().matmul(total_input))


def install() -> None:
    """Make megatron-core's linear layers accept gradient_accumulation_fusion without apex."""
    from megatron.core import utils
    from megatron.core.tensor_parallel import layers

    if layers._grad_accum_fusion_available:
        return
    this = sys.modules[__name__]
    layers.fused_weight_gradient_mlp_cuda = this
    layers._grad_accum_fusion_available = True
    utils.fused_weight_gradient_mlp_cuda = this  # drain_embedding_wgrad_compute's call site
