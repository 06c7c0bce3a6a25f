"""Keep freed CPU memory in the process instead of handing it back to the kernel.

glibc's malloc serves large blocks (above a threshold that tops out at 32 MiB) with mmap
and unmaps them when they are freed, so the next allocation of that size faults in fresh
pages that the kernel must zero. A training step frees and allocates the same activations
and gradients every iteration: on CPU the reference model (benchmarks/speed/model_step.py) took
100-150K page faults and 0.3-0.5 s of kernel time per step. `keep_freed_memory()` makes
glibc serve every block from its heap and never trim it: after a few steps the heap has
settled and a step faults no pages (kernel time 0.06-0.09 s). The process keeps its peak
footprint (plus the heap's fragmentation), which a training job reaches every step anyway.

Huge pages for tensors (PyTorch's THP_MEM_ALLOC_ENABLE=1) also remove the faults, but
their 2 MiB alignment made the step slower here (user time 9.2 s against 8.0 s for the
reference GPT step in one measurement), so they stay off.
Only glibc (Linux) has these knobs; elsewhere, or with RETRO_TOOLKIT_MALLOC=default,
nothing changes.
"""

from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_applied = False


def keep_freed_memory() -> bool:
    """Switch glibc malloc to keep freed memory; True when it is (now) on."""
    global _applied
    if _applied:
        return True
    if os.environ.get("RETRO_TOOLKIT_MALLOC", "keep") == "default" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    ok = ok and libc.mallopt(_M_TOP_PAD, 64 << 20)  # grow the heap in 64 MiB steps
    _applied = bool(ok)
    return _applied
