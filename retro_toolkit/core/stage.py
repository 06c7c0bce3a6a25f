"""What a stage function receives inside its job, and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from retro_toolkit.core.dist import DistEnv
from retro_toolkit.core.progress import Progress


@dataclass
class StageContext:
    name: str
    recipe: DictConfig
    env: DistEnv
    # The runner found models trained on this stage's output that must keep reading what they
    # read (build_db: the train split's neighbours; runner/manifest.py).
    keep_trained: bool = False

    @property
    def workdir(self) -> Path:
        return Path(self.recipe.workdir)

    def log(self, msg: str) -> None:
        if self.env.is_main:
            print(f"[{self.name}] {msg}", flush=True)

    def progress(self, label: str, total: int | None, unit: str = "items") -> Progress:
        return Progress(f"{self.name}: {label}", total, unit, enabled=self.env.is_main)


@dataclass
class StageResult:
    # Paths relative to the work directory; the manifest lists them and a rerun checks them.
    outputs: list[str]
    # Short facts for the summary table and the manifest (counts, sizes, ids).
    summary: dict[str, Any] = field(default_factory=dict)
    # The run kept what trained models read (StageContext.keep_trained honoured): their pin stays.
    kept_trained: bool = False
