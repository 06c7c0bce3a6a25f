"""Which torch.distributed backend a job's process group gets: the device decides, torchrun or not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from retro_toolkit.core import dist

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cuda,backend", [(True, "nccl"), (False, "gloo")])
def test_the_backend_follows_the_device(cuda, backend):
    assert dist.backend(cuda) == backend


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_cuda_job_asks_for_nccl_on_its_own_gpu_with_or_without_torchrun(monkeypatch, world_size):
    """What init() asks torch.distributed for on a CUDA machine (recorded: NCCL cannot start here).
    One plain process gets a world of one on an in-process store, torchrun's ranks the env
    rendezvous; both on NCCL, after selecting the rank's local GPU."""
    import torch
    import torch.distributed as td

    calls, devices = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setattr(td, "is_initialized", lambda: False)
    monkeypatch.setattr(td, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    from retro_toolkit.core import watch

    monkeypatch.setattr(watch, "Watch", lambda rank, world, node, timeout_s: ("watch", rank, world, timeout_s))
    monkeypatch.setattr(dist, "_watch", None)
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("RANK", "1" if world_size > 1 else "0")
    monkeypatch.setenv("LOCAL_RANK", "1" if world_size > 1 else "0")
    dist.init(70, world_of_one=True)
    [(backend, kw)] = calls
    assert backend == "nccl"
    assert devices == [1 if world_size > 1 else 0]
    if world_size == 1:
        assert isinstance(kw["store"], td.HashStore) and kw["rank"] == 0 and kw["world_size"] == 1
        assert dist._watch is None
    else:
        assert "store" not in kw  # torchrun's MASTER_ADDR/MASTER_PORT
        assert kw["timeout"].total_seconds() == 70
        assert dist._watch == ("watch", 1, 2, 70)  # barriers wait on the job's store, watched


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_cpu_job_gets_gloo(tmp_path, nproc):
    """The real thing on this machine: megatron-core's parallel state over the group init made."""
    script = tmp_path / "backend.py"
    script.write_text(
        "import os, torch.distributed as td\n"
        "from retro_toolkit.collections.retro.parallel import initialize\n"
        "initialize(1)\n"
        "open(f'{os.path.dirname(__file__)}/rank{td.get_rank()}', 'w').write(f'{td.get_world_size()} {td.get_backend()}')\n"
    )
    cmd = [sys.executable, str(script)] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"},
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [(tmp_path / f"rank{r}").read_text() for r in range(nproc)] == [f"{nproc} gloo"] * nproc
