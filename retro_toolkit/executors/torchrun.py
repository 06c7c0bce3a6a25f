"""executor: torchrun — each stage as N processes on this machine, started by torchrun
(NeMo-Run's LocalExecutor with its torchrun launcher)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from retro_toolkit.executors.common import distributed_timeout, job_env, launch_command, nproc_per_node
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


def entrypoint(cfg: DictConfig) -> str:
    return "python"  # see retro_toolkit.executors.script


def build(cfg: DictConfig, recipe: DictConfig, waits: bool = False, stage: str | None = None) -> Any:
    import nemo_run as run

    return run.LocalExecutor(ntasks_per_node=cfg.nproc_per_node, launcher="torchrun", env_vars=job_env(cfg),
                             packager=run.Packager())
