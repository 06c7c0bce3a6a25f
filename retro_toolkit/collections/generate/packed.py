"""Decode steps on CPU through MKL's packed GEMM.

A decode step multiplies b rows (one token per sequence) by every weight matrix. MKL's
ordinary sgemm handles so few rows poorly: on 2 cores, 8 rows cost 2.3-2.9x one row for
the reference model's shapes. With the weight reordered once for that row count
(torch.ops.mkl._mkl_reorder_linear_weight, what torch's inductor uses for CPU inference)
8 rows cost 1.1-1.6x one row, and the 32000-row output layer is faster even at one row.

`packed_linears(model, rows)` swaps the matmul of every megatron-core Column/Row parallel
linear layer for the packed one while it is active, for inputs of exactly `rows` rows
without autograd; everything else (prefill, training, GPUs) takes megatron-core's path.
Packed copies are kept on the model per (weight, row count), so repeated generation
does not repack; they cost one extra copy of the weights in memory.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def available() -> bool:
    return (not torch.cuda.is_available() and torch.backends.mkl.is_available()
            and hasattr(torch.ops.mkl, "_mkl_linear"))


def _cache(model) -> dict:
    if not hasattr(model, "_packed_weights"):
        model._packed_weights = {}
    return model._packed_weights


@contextlib.contextmanager
def packed_linears(model, rows: int) -> Iterator[None]:
    if not available():
        yield
        return
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    cache = _cache(model)
    # Weights of another batch size are dropped: a session usually decodes one size at a time.
    for key in [k for k in cache if k[2] != rows]:
        del cache[key]

    def packed(weight: torch.Tensor) -> torch.Tensor:
        # A weight updated in place since (more training) bumps its version: repack, replacing the old copy.
        key = (weight.data_ptr(), tuple(weight.shape), rows)
        version, value = cache.get(key, (None, None))
        if version != weight._version:
            value = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows)
            cache[key] = (weight._version, value)
        return value

    def wrap(original):
        def forward_impl(input, weight, bias=None, *args, **kwargs):
            if (torch.is_grad_enabled() or input.dtype != torch.float32 or weight.dtype != torch.float32
                    or input.shape[:-1].numel() != rows or kwargs.get("sequence_parallel")):
                return original(input, weight, bias, *args, **kwargs)
            x = input.reshape(rows, input.shape[-1])
            out = torch.ops.mkl._mkl_linear(x, packed(weight), weight, bias, rows)
            return out.reshape(*input.shape[:-1], out.shape[-1])

        return forward_impl

    layers = [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    for m in layers:
        m._forward_impl = wrap(type(m)._forward_impl.__get__(m))
    try:
        yield
    finally:
        for m in layers:
            del m._forward_impl
