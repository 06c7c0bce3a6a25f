"""megatron-core on a machine without CUDA: every shim in one place.

megatron-core 0.16.1 hard-codes CUDA at a handful of call sites that the local
(non-Transformer-Engine) specs otherwise run fine without. `apply()` patches exactly
those sites, only when CUDA is absent, and is idempotent. Each patch names the call
site it replaces; drop a patch when upstream stops needing it.

They, and the workarounds elsewhere that reach into megatron-core (wgrad.install,
checkpointing._adam_steps_kept, model._mark_tensor_parallel_weights), were written and
tested against the versions in TESTED_MEGATRON_CORE; `check_version()` says so once when
another one is installed.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

TESTED_MEGATRON_CORE = ("0.16.1",)
_applied = False
_version_checked = False


def check_version() -> str | None:
    """Warn (once) when the installed megatron-core is not one these patches were tested on;
    returns the warning's text, or None."""
    global _version_checked
    if _version_checked:
        return None
    _version_checked = True
    from megatron import core

    found = getattr(core, "__version__", "unknown")
    if found in TESTED_MEGATRON_CORE:
        return None
    text = (f"megatron-core {found} is installed, but retro_toolkit's patches of its internals were tested on "
            f"{', '.join(TESTED_MEGATRON_CORE)}: if a stage fails inside megatron-core, install "
            f"megatron-core=={TESTED_MEGATRON_CORE[-1]}.")
    warnings.warn(text, stacklevel=2)
    return text


def apply() -> bool:
    """Install the shims if CUDA is absent. Returns True when they are (now) installed."""
    global _applied
    import torch

    check_version()
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    _patch_memory_buffer()
    _patch_rotary()
    _patch_rng()
    _patch_causal_masks()
    _patch_cuda_synchronize()
    _patch_tensor_parallel_buffers()
    _patch_dist_checkpointing_devices()
    _patch_ddp_and_optimizer()
    _patch_mixed_precision_optimizers()
    _patch_kv_cache()
    _applied = True
    return True


def _patch_memory_buffer() -> None:
    # megatron/core/utils.py GlobalMemoryBuffer.get_tensor allocates its scratch on
    # torch.cuda.current_device(); DotProductAttention takes its score buffer from it.
    import functools
    import operator

    import torch
    from megatron.core import utils

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        required_len = functools.reduce(operator.mul, tensor_shape, 1)
        buf = self.buffer.get((name, dtype))
        if buf is None or buf.numel() < required_len:
            buf = torch.empty(required_len, dtype=dtype, device="cpu", requires_grad=False)
            self.buffer[(name, dtype)] = buf
        return buf[0:required_len].view(*tensor_shape)

    utils.GlobalMemoryBuffer.get_tensor = get_tensor


def _patch_rotary() -> None:
    # megatron/core/models/common/embeddings/rotary_pos_embedding.py
    # RotaryEmbedding.get_emb moves inv_freq to torch.cuda.current_device() on first use.
    import torch
    from megatron.core.models.common.embeddings import rotary_pos_embedding as rope

    def get_emb(self, max_seq_len: int, offset: int = 0):
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        if not self.rotary_interleaved:
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(
                freqs.shape[0], -1
            )
        return emb[:, None, None, :]

    rope.RotaryEmbedding.get_emb = get_emb


def _patch_rng() -> None:
    # megatron/core/tensor_parallel/random.py: CudaRNGStatesTracker.add/fork read and set
    # torch.cuda RNG states (used by DotProductAttention's dropout and by
    # model_parallel_cuda_manual_seed), and CheckpointFunction saves/restores them through
    # _get_cuda_rng_state/_set_cuda_rng_state. On CPU the tracked states are CPU generator
    # states: fork swaps the CPU generator, so tensor-parallel dropout streams stay distinct.
    import torch
    from megatron.core.tensor_parallel import random as mrandom

    base = mrandom.CudaRNGStatesTracker

    class CpuRNGStatesTracker(base):  # type: ignore[misc, valid-type]
        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            gen = torch.Generator()
            gen.manual_seed(seed)
            self.states_[name] = gen.get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    def get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
        return torch.get_rng_state()

    def set_state(new_state, device: int = -1, graph_safe: bool = False):
        torch.set_rng_state(new_state)

    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    # A tracker created before apply() is the CUDA one: drop it so the next get builds ours.
    mrandom._CUDA_RNG_STATE_TRACKER = None
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = False

    # model_parallel_cuda_manual_seed seeds torch.cuda (queued lazily, never run on CPU);
    # seed the CPU generator too so "the default state" means the same thing here.
    original_seed = mrandom.model_parallel_cuda_manual_seed

    def model_parallel_cuda_manual_seed(seed: int, *args, **kwargs):
        torch.manual_seed(seed)
        return original_seed(seed, *args, **kwargs)

    mrandom.model_parallel_cuda_manual_seed = model_parallel_cuda_manual_seed
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed = model_parallel_cuda_manual_seed


def _patch_causal_masks() -> None:
    # megatron/core/transformer/utils.py get_default_causal_mask and
    # get_sliding_window_causal_mask build on device="cuda"; FusedScaleMaskSoftmax's torch
    # path (fusions/fused_softmax.py) calls them, by imported name, when no mask is passed.
    import functools

    import torch
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as tutils

    @functools.lru_cache(maxsize=16)
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    def get_sliding_window_causal_mask(sq, skv, window_size):
        m = torch.ones(sq, skv, dtype=torch.bool)
        mu = torch.triu(m, diagonal=skv - sq - window_size[0])
        return ~torch.tril(mu, diagonal=skv - sq + window_size[1])

    for mod in (tutils, fused_softmax):
        mod.get_default_causal_mask = get_default_causal_mask
        mod.get_sliding_window_causal_mask = get_sliding_window_causal_mask


def _patch_cuda_synchronize() -> None:
    # megatron/core/dist_checkpointing: strategies/fully_parallel.py, async_utils.py,
    # filesystem_async.py and tensor_aware_state_dict.py call torch.cuda.synchronize(),
    # which raises on a CPU-only torch. With no CUDA there is nothing to wait for.
    import torch

    torch.cuda.synchronize = lambda device=None: None


def _cpu_torch_view() -> Any:
    """A view of torch for one megatron module: torch.cuda.current_device() answers "cpu" and
    tensor factories called with device="cuda" build on the CPU; all else is torch."""
    import functools
    import types

    import torch

    class _Cuda(types.SimpleNamespace):
        def __getattr__(self, name: str) -> Any:
            return getattr(torch.cuda, name)

        @staticmethod
        def current_device() -> str:
            return "cpu"

    def on_cpu(factory):
        @functools.wraps(factory)
        def build(*args, **kwargs):
            device = kwargs.get("device")
            if device is not None and str(device).startswith("cuda"):
                kwargs["device"] = "cpu"
            return factory(*args, **kwargs)

        return build

    class _Torch(types.ModuleType):
        cuda = _Cuda()
        zeros = staticmethod(on_cpu(torch.zeros))
        ones = staticmethod(on_cpu(torch.ones))
        empty = staticmethod(on_cpu(torch.empty))
        full = staticmethod(on_cpu(torch.full))
        tensor = staticmethod(on_cpu(torch.tensor))

        def __getattr__(self, name: str) -> Any:
            return getattr(torch, name)

    return _Torch("torch")


def _patch_ddp_and_optimizer() -> None:
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

    proxy = _cpu_torch_view()
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


@contextlib.contextmanager
def _cuda_type_names():
    """While inside, a CPU parameter's type() answers with the CUDA name of its dtype."""
    import torch

    own = torch.nn.Parameter.__dict__.get("type")

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not self.is_cuda:
            return torch.Tensor.type(self).replace("torch.", "torch.cuda.", 1)
        return torch.Tensor.type(self, dtype, non_blocking, **kwargs)

    torch.nn.Parameter.type = type_
    try:
        yield
    finally:
        if own is None:
            del torch.nn.Parameter.type
        else:
            torch.nn.Parameter.type = own


def _patch_mixed_precision_optimizers() -> None:
    # megatron/core/optimizer/optimizer.py Float16OptimizerWithFloat16Params.__init__ (bf16
    # training) and distrib_optimizer.py DistributedOptimizer.__init__ (through
    # _build_model_and_main_param_groups) sort the parameters by param.type() against
    # 'torch.cuda.{BFloat16,Half,Float}Tensor' and raise TypeError on anything else, so a CPU
    # parameter is refused. Their constructors run with CUDA type names for CPU parameters;
    # nothing else changes (main params are still CPU fp32 clones). distrib_optimizer's
    # module-level `torch` becomes the CPU view (its state-dict shards use current_device()).
    import functools

    from megatron.core.optimizer import distrib_optimizer
    from megatron.core.optimizer import optimizer as moptimizer

    for cls in (moptimizer.Float16OptimizerWithFloat16Params, distrib_optimizer.DistributedOptimizer):
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, _init=init, **kwargs):
            with _cuda_type_names():
                _init(self, *args, **kwargs)

        cls.__init__ = __init__
    distrib_optimizer.torch = _cpu_torch_view()


def _patch_dist_checkpointing_devices() -> None:
    # megatron/core/dist_checkpointing/strategies/state_dict_saver.py
    # (save_state_dict_async_finalize: the all-reduced failure flag) and
    # strategies/async_utils.py (the async caller's liveness and call-index all-reduces)
    # put small tensors on torch.cuda.current_device(): every dist_checkpointing.save
    # reaches the first. Their module-level `torch` becomes the CPU view.
    # Not covered (not on the default save/load path): state_dict_saver's
    # verify_global_md_reuse (device='cuda') and exchange_utils (fully parallel load).
    from megatron.core.dist_checkpointing.strategies import async_utils, state_dict_saver

    proxy = _cpu_torch_view()
    for mod in (state_dict_saver, async_utils):
        mod.torch = proxy


def _patch_tensor_parallel_buffers() -> None:
    # megatron/core/tensor_parallel/mappings.py (_gather_along_last_dim, _gather_along_first_dim,
    # _reduce_scatter_*, all_to_all) and tensor_parallel/layers.py (sequence-parallel all-gather
    # buffers, GPU-side weight init) allocate with device=torch.cuda.current_device(): TP=2
    # logits gathering fails without this. Their module-level `torch` becomes the CPU view.
    from megatron.core.tensor_parallel import layers, mappings

    proxy = _cpu_torch_view()
    for mod in (mappings, layers):
        mod.torch = proxy


def quiet_warnings() -> None:
    """Drop megatron-core's and torch's warnings that say nothing actionable to a user.

    Call before megatron-core is imported (its fallbacks warn at import time).
    """
    import warnings

    for message in (
        "Transformer Engine and Apex are not installed",  # megatron.core.optimizer etc.: torch fallbacks
        "Apex is not installed",  # megatron.core.models.backends: torch norms
        "full scope is deprecated",  # TransformerConfig's cuda_graph_scope default
        r"`load_state_dict` is deprecated",  # dist_checkpointing calls torch.distributed.checkpoint's old name
    ):
        warnings.filterwarnings("ignore", message=message)


def _patch_kv_cache() -> None:
    # megatron/core/transformer/attention.py Attention._allocate_memory puts the static
    # inference KV cache on torch.cuda.current_device() (generation with a KV cache).
    from megatron.core.transformer import attention

    attention.torch = _cpu_torch_view()
