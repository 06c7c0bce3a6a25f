"""executor: docker — each stage in a container on this machine (NeMo-Run's DockerExecutor),
with the work directory mounted at its own path; several processes run under torchrun."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from retro_toolkit.core.dist import share_cores
from retro_toolkit.executors.common import distributed_timeout, job_env, launch_command, nproc_per_node
from retro_toolkit.recipe.fields import WHY_CLUSTER, bounded


@dataclass
class DockerExecutorConfig:
    # The stage runs in a container on this machine (NeMo-Run's DockerExecutor): build
    # the image from the repository's Dockerfile (docker build -t retro-toolkit .).
    type: str = "docker"
    container_image: str = "retro-toolkit:latest"
    # Processes in the container; more than one runs the stage under torchrun.
    nproc_per_node: int = bounded(1, 1, 1024, WHY_CLUSTER)
    # GPUs handed to the container (-1 = all, null = none).
    num_gpus: Optional[int] = bounded(None, -1, 1024, WHY_CLUSTER)
    # host:container bind mounts; the work directory is always mounted at the same path.
    volumes: list[str] = field(default_factory=list)
    # Shared memory for the container (data loaders and NCCL want more than Docker's 64 MB).
    shm_size: str = "16g"
    # Python inside the image.
    python: str = "python"
    # Seconds a rank waits in a collective for the others before the job fails (a node
    # that died or dropped off the network); raise it for very long checkpoint writes.
    distributed_timeout_s: int = distributed_timeout()
    env: dict[str, str] = field(default_factory=dict)
    stages: dict[str, Any] = field(default_factory=dict)


def describe(cfg: DictConfig) -> str:
    return f"docker {cfg.container_image} x{cfg.nproc_per_node}"


command = launch_command


def entrypoint(cfg: DictConfig) -> str:
    return "python" if processes(cfg) > 1 else cfg.python  # see retro_toolkit.executors.script


processes = nproc_per_node


def _env(cfg: DictConfig) -> dict[str, str]:
    env = job_env(cfg)
    share_cores(env, processes(cfg))  # the container runs on this machine's cores
    return env


def build(cfg: DictConfig, recipe: DictConfig, waits: bool = False, stage: str | None = None) -> Any:
    import nemo_run as run

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
        launcher="torchrun" if processes(cfg) > 1 else None,
        packager=run.Packager(),
    )
