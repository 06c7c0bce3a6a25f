"""Executor settings (recipe data) -> NeMo-Run executors and the job's command.

Every executor runs the same command, `python -m retro_toolkit.launch STAGE RECIPE`;
only where and how many times differs. nemo_run is imported here, lazily, and nowhere
else outside the runner.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from retro_toolkit.recipe.executors import processes

LAUNCH_MODULE = "retro_toolkit.launch"
# How long a stopping training stage may take to save: Slurm signals a training job's
# processes this long before its time limit (at most a tenth of the limit; sbatch
# --signal=TERM@N, which executor.additional_parameters.signal overrides), and torchrun waits
# this long for its workers after SIGTERM before SIGKILL.
STOP_WARNING_S = 600
# Stages that save a checkpoint and stop on SIGTERM; the others just end, and resume anyway.
SAVES_ON_SIGNAL = ("pretrain", "sft")


def logs_root(recipe: DictConfig) -> Path:
    """NeMo-Run's home for this recipe: job scripts and logs live in the work directory."""
    return Path(recipe.workdir) / "logs"


def _env(cfg: DictConfig) -> dict[str, str]:
    env = {str(k): str(v) for k, v in cfg.env.items()}
    python = cfg.get("python", "python")
    if os.path.isabs(python) and "PATH" not in env:
        # torchrun (and `python` itself) are found on the job's PATH, not by absolute path.
        env["PATH"] = f"{os.path.dirname(python)}:$PATH"
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("LOGLEVEL", "WARNING")  # torchrun's agent logs every rendezvous step at INFO
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(STOP_WARNING_S))
    return env


def uses_torchrun(cfg: DictConfig) -> bool:
    """torchrun starts the ranks: always for executor torchrun, else when a job has several."""
    return cfg.type == "torchrun" or (cfg.type in ("slurm", "docker") and processes(cfg) > 1)


def stop_warning_s(time_limit: str | None) -> int:
    """Seconds before a Slurm time limit ("MM", "MM:SS", "HH:MM:SS", "D-HH[:MM[:SS]]") at which a
    training job is told to save: STOP_WARNING_S, or a tenth of a shorter limit."""
    try:
        days, _, clock = str(time_limit).rpartition("-")
        parts = [int(x) for x in clock.split(":")]
        if days:  # D-HH, D-HH:MM, D-HH:MM:SS
            parts = [int(days) * 24 + parts[0], *parts[1:], 0, 0][:3]
            seconds = parts[0] * 3600 + parts[1] * 60 + parts[2]
        else:  # MM, MM:SS, HH:MM:SS
            seconds = {1: lambda p: p[0] * 60, 2: lambda p: p[0] * 60 + p[1],
                       3: lambda p: p[0] * 3600 + p[1] * 60 + p[2]}[len(parts)](parts)
    except (ValueError, KeyError, IndexError):
        return STOP_WARNING_S  # unlimited or the partition's default: not known here
    return max(1, min(STOP_WARNING_S, seconds // 10))


def build(cfg: DictConfig, recipe: DictConfig, waits: bool = False, stage: str | None = None) -> Any:
    """The NeMo-Run executor for one stage's job; `cfg` is executor settings merged for the
    stage (recipe.executors.for_stage). `waits`: the job has Slurm dependencies."""
    import logging

    import nemo_run as run
    from nemo_run.core.frontend.console.api import CONSOLE

    # Our runner prints the plan, the stage's own log and a summary; NeMo-Run's rich
    # console (panels, "Detected Torchrun launcher ...") would only repeat it.
    CONSOLE.quiet = True
    logging.getLogger("nemo_run").setLevel(logging.WARNING)

    if cfg.type in ("local", "torchrun"):
        nproc = cfg.nproc_per_node if cfg.type == "torchrun" else 1
        return run.LocalExecutor(
            ntasks_per_node=nproc,
            launcher="torchrun" if cfg.type == "torchrun" else None,
            env_vars=_env(cfg),
            packager=run.Packager(),
        )
    if cfg.type == "slurm":
        t = cfg.tunnel
        if t.type == "ssh":
            tunnel = run.SSHTunnel(host=t.host, user=t.user or os.environ.get("USER", ""),
                                   job_dir=t.job_dir, identity=t.identity)
        else:
            tunnel = run.LocalTunnel(job_dir=str(logs_root(recipe) / "experiments"))
        torchrun = uses_torchrun(cfg)
        extra = dict(cfg.additional_parameters)
        if stage in SAVES_ON_SIGNAL:
            # SIGTERM to the job's tasks before the time limit (torchrun passes it on to the
            # workers): the stage saves a checkpoint and stops, and the rerun resumes.
            extra.setdefault("signal", f"TERM@{stop_warning_s(cfg.time)}")
        if waits:
            # A job whose upstream failed is cancelled, not left pending forever.
            extra.setdefault("kill_on_invalid_dep", "yes")
        return run.SlurmExecutor(
            account=cfg.account,
            # NeMo-Run builds job names from the account unless a prefix is given.
            job_name_prefix=f"retro-{recipe.name}-",
            poll_estimated_start_time=False,
            partition=cfg.partition,
            nodes=cfg.nodes,
            # torchrun starts the per-node processes itself: one Slurm task per node.
            ntasks_per_node=1 if torchrun else cfg.ntasks_per_node,
            torchrun_nproc_per_node=cfg.ntasks_per_node if torchrun else None,
            gpus_per_node=cfg.gpus_per_node or None,
            cpus_per_task=cfg.cpus_per_task,
            mem=cfg.mem,
            time=cfg.time,
            container_image=cfg.container_image,
            container_mounts=list(cfg.container_mounts),
            env_vars=_env(cfg),
            additional_parameters=extra or None,
            launcher="torchrun" if torchrun else None,
            tunnel=tunnel,
            packager=run.Packager(),
        )
    if cfg.type == "docker":
        workdir = str(Path(recipe.workdir))
        return run.DockerExecutor(
            container_image=cfg.container_image,
            ntasks_per_node=cfg.nproc_per_node,
            num_gpus=cfg.num_gpus,
            shm_size=cfg.shm_size,
            ipc_mode="host",
            # The job reads and writes the work directory at the path the recipe names.
            volumes=[f"{workdir}:{workdir}", *cfg.volumes],
            env_vars=_env(cfg),
            launcher="torchrun" if uses_torchrun(cfg) else None,
            packager=run.Packager(),
        )
    raise ValueError(f"unknown executor type {cfg.type}")  # validate() rejects these first


def script(cfg: DictConfig, stage: str, recipe_file: Path) -> Any:
    import nemo_run as run

    # NeMo-Run adds torchrun's --no-python unless the entrypoint is literally "python";
    # a single local process runs this very interpreter (the one retro_toolkit is in).
    if uses_torchrun(cfg):
        entry = "python"
    elif cfg.type == "local":
        entry = sys.executable
    else:
        entry = cfg.python
    return run.Script(path=LAUNCH_MODULE, m=True, entrypoint=entry, args=[stage, str(recipe_file)])
