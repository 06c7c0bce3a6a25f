"""torch.distributed from the environment torchrun (or srun + torchrun) sets.

One process without WORLD_SIZE is a world of one: no process group is created and the
collectives below are no-ops, so stage code is written once for any world size.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any


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


# barrier() waits on its own gloo group with this timeout: at scale, ranks wait there for
# hours while rank 0 trains or fills a faiss index; the job's time limit bounds the wait.
BARRIER_TIMEOUT = datetime.timedelta(days=7)
_barrier_group: Any = None


def backend(cuda: bool) -> str:
    """The torch.distributed backend for a job's tensors: NCCL where CUDA is, gloo on CPUs.

    Every default process group of a run takes it from here, torchrun's world and a plain
    process's world of one alike (gloo cannot reduce CUDA tensors; NCCL cannot reduce CPU
    ones). Only the barrier group is gloo everywhere: it waits for days, on no tensor.
    """
    return "nccl" if cuda else "gloo"


def init(timeout_minutes: int = 60, world_of_one: bool = False) -> DistEnv:
    """Create the default process group when launched with more than one process, and with
    `world_of_one` also in a plain process (megatron-core's layers need a group at any size):
    a world of one on an in-process store, no ports."""
    global _barrier_group
    env = env_from_os()
    if env.world_size > 1 or world_of_one:
        import torch
        import torch.distributed as td

        if not td.is_initialized():
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(env.local_rank)
            alone = {} if env.world_size > 1 else dict(store=td.HashStore(), rank=0, world_size=1)
            td.init_process_group(backend(cuda), timeout=datetime.timedelta(minutes=timeout_minutes), **alone)
        if env.world_size > 1 and _barrier_group is None:
            _barrier_group = td.new_group(backend="gloo", timeout=BARRIER_TIMEOUT)
    return env


def shutdown() -> None:
    global _barrier_group
    if _initialized():
        import torch.distributed as td

        td.destroy_process_group()
    _barrier_group = None


def _initialized() -> bool:
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return False
    import torch.distributed as td

    return td.is_initialized()


def barrier() -> None:
    if _initialized():
        import torch.distributed as td

        td.barrier(group=_barrier_group)


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
