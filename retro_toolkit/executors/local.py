"""executor: local — each stage as one process on this machine (NeMo-Run's LocalExecutor)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from retro_toolkit.executors.common import job_env, launch_command


@dataclass
class LocalExecutorConfig:
    # One process on this machine.
    type: str = "local"
    env: dict[str, str] = field(default_factory=dict)
    # Per-stage overrides of the keys above (see retro_toolkit/executors/__init__.py).
    stages: dict[str, Any] = field(default_factory=dict)


def processes(cfg: DictConfig) -> int:
    return 1


def describe(cfg: DictConfig) -> str:
    return "local"


command = launch_command


def entrypoint(cfg: DictConfig) -> str:
    # This very interpreter: the one retro_toolkit is installed in.
    return sys.executable


def build(cfg: DictConfig, recipe: DictConfig, waits: bool = False, stage: str | None = None) -> Any:
    import nemo_run as run

    return run.LocalExecutor(ntasks_per_node=1, launcher=None, env_vars=job_env(cfg), packager=run.Packager())
