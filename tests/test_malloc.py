"""core/malloc.py: freed tensors' pages stay in the process, so a training step's
re-allocations fault no pages (the model stages and the benchmarks switch it on)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import resource
from retro_toolkit.core import malloc
print(malloc.keep_freed_memory())  # before torch allocates, as launch.py and the benchmarks do
import torch

def step():  # a training step's pattern: several large tensors alive at once, then all freed
    xs = [torch.ones(n << 18) for n in (64, 16, 4, 100, 3)]  # MiB
    del xs

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20

for _ in range(6):  # the heap settles into its layout (now and then a step or two later)
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
rss = rss_mib()
for _ in range(20):
    step()
print(rss_mib() - rss)
"""


def _faults(mode: str) -> tuple[str, int, int]:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    env["RETRO_TOOLKIT_MALLOC"] = mode
    p = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    kept, faults, growth = p.stdout.split()
    return kept, int(faults), int(growth)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_reallocating_large_tensors_faults_no_pages_once_memory_is_kept():
    kept, faults, growth = _faults("keep")
    step_pages = 187 << 8  # one step allocates 187 MiB
    assert kept == "True" and faults < step_pages  # over 10 steps: at most one late settling of the heap
    assert growth < 187  # MiB over 20 more steps: the kept memory is reused, not leaked step after step
    kept, faults, _ = _faults("default")
    assert kept == "False" and faults > 10 * 30000  # the 64 and 100 MiB tensors are mapped afresh every step


def test_model_stages_keep_freed_memory_before_torch_is_imported():
    code = ("import sys; import retro_toolkit.launch as l; from retro_toolkit.core import malloc; "
            "print('torch' in sys.modules, l.MODEL_PARALLEL_STAGES)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.stdout.strip() == "False ('pretrain', 'eval_ppl', 'sft', 'eval_qa')", p.stderr
