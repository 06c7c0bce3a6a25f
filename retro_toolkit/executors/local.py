"""executor: local — each stage as one process on this machine, started by the runner itself."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from retro_toolkit.executors.common import launch_command


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


def argv(cfg: DictConfig, stage: str, recipe_file: str) -> list[str]:
    # This very interpreter: the one retro_toolkit is installed in.
    module, args = command(cfg, stage, recipe_file)
    return [sys.executable, "-m", module, *args]
