"""Where and how each stage's job runs: one module per executor kind.

A recipe's `executor` section is plain data; `executor.type` picks the schema, so a Slurm
key under a local executor is an unknown key, not a silently ignored one. Each kind's
module (local, torchrun, slurm, docker) holds its settings dataclass and turns those
settings into a job: local and torchrun into a command line the runner starts on this
machine (`argv`), slurm and docker into a NeMo-Run executor (`build`; nemo_run is imported
lazily, inside those functions, since importing it takes seconds).
Every executor runs the same command, `python -m retro_toolkit.launch STAGE RECIPE`; only
where and how many times differs (torchrun starts it once per rank; a Slurm job of several
processes starts it through executors/node_launch.py, one torchrun per node).

`executor.stages` gives one stage other resources than the rest, e.g. a CPU partition
for build_db and 16 GPU nodes for pretrain:

    executor:
      type: slurm
      gpus_per_node: 8
      stages:
        build_db: {partition: cpu, gpus_per_node: 0, time: "48:00:00"}
        pretrain: {nodes: 16, ntasks_per_node: 8}

Each entry takes any key of its executor except type, stages, tunnel and python;
for_stage() returns the merged settings a stage's job runs with.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from omegaconf import DictConfig

from retro_toolkit.executors import docker, local, slurm, torchrun
from retro_toolkit.executors.common import MODEL_PARALLEL_STAGES, NOT_PER_STAGE, for_stage, logs_root

__all__ = ["EXECUTOR_SCHEMAS", "MODEL_PARALLEL_STAGES", "NOT_PER_STAGE", "argv", "build", "runs_here", "describe", "for_stage",
           "logs_root", "processes", "script"]

# Kinds whose jobs the runner starts as processes of its own, and kinds NeMo-Run starts.
_HERE: dict[str, ModuleType] = {"local": local, "torchrun": torchrun}
_NEMO_RUN: dict[str, ModuleType] = {"slurm": slurm, "docker": docker}
_KINDS: dict[str, ModuleType] = {**_HERE, **_NEMO_RUN}

# The settings dataclass of each executor.type.
EXECUTOR_SCHEMAS: dict[str, type] = {
    "local": local.LocalExecutorConfig,
    "torchrun": torchrun.TorchrunExecutorConfig,
    "slurm": slurm.SlurmExecutorConfig,
    "docker": docker.DockerExecutorConfig,
}

def processes(executor: DictConfig) -> int:
    """How many ranks a job with these (merged) settings starts."""
    return _KINDS[executor.type].processes(executor)


def describe(executor: DictConfig) -> str:
    """One line for the plan: where a stage runs and on what."""
    return _KINDS[executor.type].describe(executor)


def runs_here(cfg: DictConfig) -> bool:
    """Whether the runner starts this kind's jobs itself (argv) rather than NeMo-Run (build)."""
    return cfg.type in _HERE


def argv(cfg: DictConfig, stage: str, recipe_file: Path) -> list[str] | None:
    """The command line of one stage's job on this machine (executor local and torchrun);
    None for the kinds NeMo-Run starts (build)."""
    return _HERE[cfg.type].argv(cfg, stage, str(recipe_file)) if runs_here(cfg) else None


def build(cfg: DictConfig, recipe: DictConfig, waits: bool = False, stage: str | None = None) -> Any:
    """The NeMo-Run executor for one stage's job (executor slurm and docker); `cfg` is
    executor settings merged for the stage (for_stage). `waits`: the job has Slurm
    dependencies."""
    import logging

    from nemo_run.core.frontend.console.api import CONSOLE

    # Our runner prints the plan, the stage's own log and a summary; NeMo-Run's rich
    # console (panels, "Detected Torchrun launcher ...") would only repeat it.
    CONSOLE.quiet = True
    logging.getLogger("nemo_run").setLevel(logging.WARNING)
    if cfg.type not in _NEMO_RUN:
        raise ValueError(f"executor type {cfg.type} has no NeMo-Run executor")  # validate() rejects unknown ones
    return _NEMO_RUN[cfg.type].build(cfg, recipe, waits=waits, stage=stage)


def script(cfg: DictConfig, stage: str, recipe_file: Path) -> Any:
    """The NeMo-Run script a stage's job runs: the kind's command, `python -m
    retro_toolkit.launch STAGE RECIPE` (a Slurm job of several processes: node_launch)."""
    import nemo_run as run

    # NeMo-Run adds torchrun's --no-python unless the entrypoint is literally "python", so a
    # kind answers "python" whenever torchrun starts its ranks.
    kind = _NEMO_RUN[cfg.type]
    entry = kind.entrypoint(cfg)
    module, args = kind.command(cfg, stage, str(recipe_file))
    return run.Script(path=module, m=True, entrypoint=entry, args=args)
