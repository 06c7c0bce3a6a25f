"""megatron-core on a machine without CUDA: the patches of its internals, and their version guard.

megatron-core 0.16.1 hard-codes CUDA at a handful of call sites that the local
(non-Transformer-Engine) specs otherwise run fine without. `apply()` patches exactly
those sites, only when CUDA is absent, and is idempotent. Each patch names the call
site it replaces; drop a patch when upstream stops needing it. The model's forward pass
is patched here, the parallel training machinery in `distributed`.

They, and the workarounds elsewhere that reach into megatron-core (wgrad.install,
resume._adam_steps_kept, full_state_dict.mark_tensor_parallel_weights), were written
and tested against the versions in TESTED_MEGATRON_CORE; `check_version()` says so once
when another one is installed.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

from retro_toolkit.core.cpu import distributed
from retro_toolkit.core.cpu.shims import torch_view

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
    distributed.patch_cuda_synchronize()
    distributed.patch_tensor_parallel_buffers()
    distributed.patch_dist_checkpointing_devices()
    distributed.patch_ddp_and_optimizer()
    distributed.patch_mixed_precision_optimizers()
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


def _patch_kv_cache() -> None:
    # megatron/core/transformer/attention.py Attention._allocate_memory puts the static
    # inference KV cache on torch.cuda.current_device() (generation with a KV cache).
    from megatron.core.transformer import attention

    attention.torch = torch_view()
