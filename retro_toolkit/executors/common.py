"""What every executor kind shares: a stage's merged settings, the job's environment and
where NeMo-Run keeps a recipe's job files (Slurm, Docker). Plain data and omegaconf only (no NeMo-Run)."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# Stages that build the model with tensor parallelism over their job's processes.
MODEL_PARALLEL_STAGES = ("pretrain", "eval_ppl", "sft", "eval_qa")
# Keys one stage cannot change: they describe the cluster or the install, not a job.
NOT_PER_STAGE = ("type", "stages", "tunnel", "python")
# How long a stopping training stage may take to save: Slurm signals a training job's
# processes this long before its time limit (at most a tenth of the limit; sbatch
# --signal=TERM@N, which executor.additional_parameters.signal overrides), and torchrun waits
# this long for its workers after SIGTERM before SIGKILL.
STOP_WARNING_S = 600
# How long a rank waits in a collective for the others before its job fails
# (executor.distributed_timeout_s). A rank on a node that died closes its sockets and
# the others fail at once; a node cut off the network closes nothing, and this bound is all
# that ends the wait.
DIST_TIMEOUT_S = 600


def distributed_timeout(default: int = DIST_TIMEOUT_S):
    """The field `distributed_timeout_s` of the kinds that start several processes."""
    from retro_toolkit.recipe.fields import bounded

    return bounded(default, 10, 7 * 24 * 3600, "a week is beyond any wait worth making (check for a typo)")


def timeout_s(executor: DictConfig, stage: str) -> int:
    """The collective timeout `stage`'s job runs with, in seconds."""
    return int(for_stage(executor, stage).get("distributed_timeout_s", DIST_TIMEOUT_S))


# The module every job's processes run: `python -m retro_toolkit.launch STAGE RECIPE`.
LAUNCH_MODULE = "retro_toolkit.launch"


def launch_command(cfg: DictConfig, stage: str, recipe_file: str) -> tuple[str, list[str]]:
    """The module a job runs and its arguments, for the kinds that start it directly."""
    return LAUNCH_MODULE, [stage, recipe_file]


def nproc_per_node(cfg: DictConfig) -> int:
    """The process count of the kinds that start processes on one machine (torchrun, docker)."""
    return cfg.nproc_per_node


def for_stage(executor: DictConfig, stage: str) -> DictConfig:
    """The executor settings `stage`'s job runs with: the recipe's, then its stages entry."""
    base = OmegaConf.to_container(executor)
    override = base.pop("stages", {}).get(stage) or {}
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}  # env, additional_parameters: add keys
        else:
            base[key] = value
    return OmegaConf.create(base)


def logs_root(recipe: DictConfig) -> Path:
    """NeMo-Run's home for this recipe: job scripts and logs live in the work directory."""
    return Path(recipe.workdir) / "logs"


def job_env(cfg: DictConfig) -> dict[str, str]:
    """The environment variables a job runs with: the executor's env, then the defaults."""
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
