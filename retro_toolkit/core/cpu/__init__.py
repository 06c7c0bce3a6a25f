"""The CPU backend: megatron-core without Transformer Engine, apex or CUDA.

    patches      the megatron-core call sites patched where CUDA is absent (`apply`), and
                 the versions they were tested on (`check_version`)
    distributed  those patches for tensor-parallel collectives, DDP, optimizers, checkpointing
    shims        the stand-ins the patches hand to megatron-core (a CPU view of torch)
    modules      local replacements for megatron-core modules (Norm, SDPAttention)
    rope         self-attention with a cheaper rotary embedding (RetroSelfAttention)
    quiet        silencing the warnings about the fallbacks (`quiet_warnings`)

Importing this package imports neither torch nor megatron-core (quiet_warnings must run
before megatron-core is imported); `modules` and `rope` import both.
"""

from retro_toolkit.core.cpu.patches import TESTED_MEGATRON_CORE, apply, check_version
from retro_toolkit.core.cpu.quiet import quiet_warnings

__all__ = ["TESTED_MEGATRON_CORE", "apply", "check_version", "quiet_warnings"]
