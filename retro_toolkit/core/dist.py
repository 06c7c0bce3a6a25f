"""torch.distributed from the environment torchrun (or srun + torchrun) sets.

One process without WORLD_SIZE is a world of one: no process group is created and the
collectives below are no-ops, so stage code is written once for any world size.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, MutableMapping


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_os() -> DistEnv:
    return DistEnv(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def usable_cpus() -> int:
    """The cores this process may run on: its affinity mask, which Slurm's cpusets, `taskset`
    and container CPU sets narrow (os.cpu_count() counts the whole machine's)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def cpus_per_rank(local_world_size: int) -> int:
    """Threads for one rank's CPU work (embedding, faiss): OMP_NUM_THREADS where it is set,
    as torch's own thread pool takes it, else the usable cores shared by the node's ranks."""
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    return max(1, usable_cpus() // max(1, local_world_size))


def share_cores(env: MutableMapping[str, str], nproc_per_node: int) -> None:
    """Set OMP_NUM_THREADS in `env`, the environment torchrun starts this node's ranks with,
    to the usable cores shared by the ranks, unless it is set already. Left unset, torchrun
    gives each of several ranks one thread, which leaves a CPU node's cores idle."""
    if nproc_per_node > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, usable_cpus() // nproc_per_node)))


# barrier() waits with no time limit while every rank is alive (at scale, for hours while
# rank 0 trains or fills a faiss index) and fails once one goes silent (core/watch.py).
_watch: Any = None
_timeout_s = 600.0


def backend(cuda: bool) -> str:
    """The torch.distributed backend for a job's tensors: NCCL where CUDA is, gloo on CPUs.

    Every default process group of a run takes it from here, torchrun's world and a plain
    process's world of one alike (gloo cannot reduce CUDA tensors; NCCL cannot reduce CPU
    ones). barrier() waits on the job's store instead (core/watch.py), on no tensor.
    """
    return "nccl" if cuda else "gloo"


def init(timeout_s: float = 600, world_of_one: bool = False) -> DistEnv:
    """Create the default process group when launched with more than one process, and with
    `world_of_one` also in a plain process (megatron-core's layers need a group at any size):
    a world of one on an in-process store, no ports."""
    global _watch, _timeout_s
    env = env_from_os()
    if env.world_size > 1 or world_of_one:
        import torch
        import torch.distributed as td

        if not td.is_initialized():
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(env.local_rank)
            _timeout_s = timeout_s
            alone = {} if env.world_size > 1 else dict(store=td.HashStore(), rank=0, world_size=1)
            td.init_process_group(backend(cuda), timeout=datetime.timedelta(seconds=timeout_s), **alone)
        if env.world_size > 1 and _watch is None:
            from retro_toolkit.core.watch import Watch

            _watch = Watch(env.rank, env.world_size, node_name(), timeout_s=_timeout_s)
    return env


def collective_timeout_minutes() -> float:
    """The timeout the default group was made with, for the groups made after it
    (megatron-core's model-parallel groups)."""
    return _timeout_s / 60


def node_name() -> str:
    """This process's node: Slurm's name for it inside a job, else the hostname."""
    import socket

    return os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]


def abandon_if_cut_off() -> None:
    """After a failure: when this node can no longer reach the job's store (its link is
    down, or the first node died), stop this node's torchrun too. Its own shutdown talks to
    that store and would wait for TCP to give up (a quarter of an hour), holding the node."""
    if _watch is None or not _watch.store_lost():
        return
    import signal

    agent = os.getppid()
    try:
        with open(f"/proc/{agent}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return
    if "torch.distributed.run" in cmdline or "torchrun" in cmdline:
        print(f"the job's store is out of reach from {node_name()}: stopping this node's torchrun (pid {agent})",
              flush=True)
        os.kill(agent, signal.SIGKILL)


def shutdown() -> None:
    global _watch
    if _watch is not None:
        _watch.close()
    if _initialized():
        import torch.distributed as td

        td.destroy_process_group()
    _watch = None


def _initialized() -> bool:
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return False
    import torch.distributed as td

    return td.is_initialized()


def barrier() -> None:
    """Wait for every rank; raise watch.PeerLost once a rank goes silent for the collective
    timeout (never while all are alive, however long the wait)."""
    if _initialized() and _watch is not None:
        _watch.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not _initialized():
        return obj
    import torch.distributed as td

    box = [obj]
    td.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if not _initialized():
        return [obj]
    import torch.distributed as td

    out: list[Any] = [None] * td.get_world_size()
    td.all_gather_object(out, obj)
    return out
