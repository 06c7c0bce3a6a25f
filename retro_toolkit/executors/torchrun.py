"""executor: torchrun — each stage as N processes on this machine, under a torchrun the
runner starts itself."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from retro_toolkit.executors.common import distributed_timeout, launch_command, nproc_per_node
from retro_toolkit.recipe.fields import WHY_CLUSTER, bounded


@dataclass
class TorchrunExecutorConfig:
    # N processes on this machine through torchrun (gloo on CPU, nccl on GPU).
    type: str = "torchrun"
    nproc_per_node: int = bounded(2, 1, 1024, WHY_CLUSTER)
    # Seconds a rank waits in a collective for the others before the job fails (a node
    # that died or dropped off the network); raise it for very long checkpoint writes.
    distributed_timeout_s: int = distributed_timeout()
    env: dict[str, str] = field(default_factory=dict)
    # Per-stage overrides, e.g. {tokenizer: {nproc_per_node: 1}}.
    stages: dict[str, Any] = field(default_factory=dict)


processes = nproc_per_node


def describe(cfg: DictConfig) -> str:
    return f"torchrun x{cfg.nproc_per_node}"


command = launch_command


def argv(cfg: DictConfig, stage: str, recipe_file: str) -> list[str]:
    module, args = command(cfg, stage, recipe_file)
    # --standalone: the rendezvous on a free port of this machine. --tee 3: each worker's
    # output goes to torchrun's too, its lines prefixed with the rank. --max-restarts 0: a
    # failed rank fails the job (a stage resumes by being run again, not by torchrun).
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(cfg.nproc_per_node), "--max-restarts", "0", "--tee", "3", "-m", module, *args]
