"""CPU patches of megatron-core's parallel training machinery: tensor-parallel collectives,
the DDP wrapper, its optimizers and dist_checkpointing.

Each function patches the call sites its comment names; `patches.apply()` runs them.
"""

from __future__ import annotations

import functools

from retro_toolkit.core.cpu.shims import cuda_type_names, torch_view


def patch_cuda_synchronize() -> None:
    # megatron/core/dist_checkpointing: strategies/fully_parallel.py, async_utils.py,
    # filesystem_async.py and tensor_aware_state_dict.py call torch.cuda.synchronize(),
    # which raises on a CPU-only torch. With no CUDA there is nothing to wait for.
    import torch

    torch.cuda.synchronize = lambda device=None: None


def patch_tensor_parallel_buffers() -> None:
    # megatron/core/tensor_parallel/mappings.py (_gather_along_last_dim, _gather_along_first_dim,
    # _reduce_scatter_*, all_to_all) and tensor_parallel/layers.py (sequence-parallel all-gather
    # buffers, GPU-side weight init) allocate with device=torch.cuda.current_device(): TP=2
    # logits gathering fails without this. Their module-level `torch` becomes the CPU view.
    from megatron.core.tensor_parallel import layers, mappings

    proxy = torch_view()
    for mod in (mappings, layers):
        mod.torch = proxy


def patch_dist_checkpointing_devices() -> None:
    # megatron/core/dist_checkpointing/strategies/state_dict_saver.py
    # (save_state_dict_async_finalize: the all-reduced failure flag) and
    # strategies/async_utils.py (the async caller's liveness and call-index all-reduces)
    # put small tensors on torch.cuda.current_device(): every dist_checkpointing.save
    # reaches the first. Their module-level `torch` becomes the CPU view.
    # Not covered (not on the default save/load path): state_dict_saver's
    # verify_global_md_reuse (device='cuda') and exchange_utils (fully parallel load).
    from megatron.core.dist_checkpointing.strategies import async_utils, state_dict_saver

    proxy = torch_view()
    for mod in (state_dict_saver, async_utils):
        mod.torch = proxy


def patch_ddp_and_optimizer() -> None:
    # megatron/core/distributed/param_and_grad_buffer.py (_ParamAndGradBuffer's grad and param
    # buffers on torch.cuda.current_device()), distributed_data_parallel.py (same),
    # optimizer/optimizer.py (ChainedOptimizer.get_loss_scale, the fp16 scaler's tensors on
    # "cuda") and optimizer/clip_grads.py (get_grad_norm_fp32 / count_zeros_fp32 build their
    # norm accumulators with device="cuda"). Their module-level `torch` becomes the CPU view,
    # megatron/core/utils.py local_multi_tensor_l2_norm (the no-apex grad norm) returns its
    # result on "cuda". The DDP wrapper, get_megatron_optimizer and grad clipping then run
    # on CPU with gloo.
    from megatron.core import utils
    from megatron.core.distributed import distributed_data_parallel, param_and_grad_buffer
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as moptimizer

    proxy = torch_view()
    for mod in (param_and_grad_buffer, distributed_data_parallel, moptimizer, clip_grads, utils):
        mod.torch = proxy

    # clip_grads.clip_grad_by_total_norm_fp32 asserts grad.type() == "torch.cuda.FloatTensor";
    # optimizer.py imported it by name. Same scaling, any device.
    import torch

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0 and grads:
            torch._foreach_mul_(grads, clip_coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    moptimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


def patch_mixed_precision_optimizers() -> None:
    # megatron/core/optimizer/optimizer.py Float16OptimizerWithFloat16Params.__init__ (bf16
    # training) and distrib_optimizer.py DistributedOptimizer.__init__ (through
    # _build_model_and_main_param_groups) sort the parameters by param.type() against
    # 'torch.cuda.{BFloat16,Half,Float}Tensor' and raise TypeError on anything else, so a CPU
    # parameter is refused. Their constructors run with CUDA type names for CPU parameters;
    # nothing else changes (main params are still CPU fp32 clones). distrib_optimizer's
    # module-level `torch` becomes the CPU view (its state-dict shards use current_device()).
    from megatron.core.optimizer import distrib_optimizer
    from megatron.core.optimizer import optimizer as moptimizer

    for cls in (moptimizer.Float16OptimizerWithFloat16Params, distrib_optimizer.DistributedOptimizer):
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, _init=init, **kwargs):
            with cuda_type_names():
                _init(self, *args, **kwargs)

        cls.__init__ = __init__
    distrib_optimizer.torch = torch_view()
