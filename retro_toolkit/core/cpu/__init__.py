"""The CPU backend: megatron-core without Transformer Engine, apex or CUDA.

    patches      the megatron-core call sites patched where CUDA is absent (`apply`), and
                 the versions they were tested on (`check_version`)
    distributed  those patches for tensor-parallel collectives, DDP, optimizers, checkpointing
    shims        the stand-ins the patches hand to megatron-core (a CPU view of torch)
    modules      local replacements for megatron-core modules (Norm, SDPAttention)
    rope         self-attention with a cheaper rotary embedding (RetroSelfAttention)
    quiet        silencing the warnings about the fallbacks (`quiet_warnings`)
    lazy_compile megatron-core's torch.compile'd kernels compiled at first call, not at import

Importing this package imports neither torch nor megatron-core (`before_megatron` must run
before megatron-core is imported); `modules` and `rope` import both.
"""

from retro_toolkit.core.cpu.patches import TESTED_MEGATRON_CORE, apply, check_version
from retro_toolkit.core.cpu import lazy_compile
from retro_toolkit.core.cpu.quiet import quiet_warnings


def before_megatron() -> None:
    """What a process that will import megatron-core does first: silence its fallback warnings,
    and keep its import from importing torch's compiler (lazy_compile)."""
    quiet_warnings()
    lazy_compile.install()


__all__ = ["TESTED_MEGATRON_CORE", "apply", "before_megatron", "check_version", "quiet_warnings"]
