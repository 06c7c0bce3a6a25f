"""Executor settings: plain data, one dataclass per executor type.

`executor.type` picks the schema, so a Slurm key under a local executor is an unknown
key, not a silently ignored one. runner/executors.py turns these into NeMo-Run objects.

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

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

# Stages that build the model with tensor parallelism over their job's processes.
MODEL_PARALLEL_STAGES = ("pretrain", "eval_ppl", "sft", "eval_qa")
# Keys one stage cannot change: they describe the cluster or the install, not a job.
NOT_PER_STAGE = ("type", "stages", "tunnel", "python")


@dataclass
class LocalExecutorConfig:
    # One process on this machine.
    type: str = "local"
    env: dict[str, str] = field(default_factory=dict)
    # Per-stage overrides of the keys above (see the module docstring).
    stages: dict[str, Any] = field(default_factory=dict)


@dataclass
class TorchrunExecutorConfig:
    # N processes on this machine through torchrun (gloo on CPU, nccl on GPU).
    type: str = "torchrun"
    nproc_per_node: int = 2
    env: dict[str, str] = field(default_factory=dict)
    # Per-stage overrides, e.g. {tokenizer: {nproc_per_node: 1}}.
    stages: dict[str, Any] = field(default_factory=dict)


@dataclass
class TunnelConfig:
    # "local": sbatch runs on this machine (a login node); "ssh": through host/user.
    type: str = "local"
    host: Optional[str] = None
    user: Optional[str] = None
    identity: Optional[str] = None
    # Where job scripts and logs live on the cluster (ssh tunnels only; local tunnels
    # keep them under <workdir>/logs).
    job_dir: Optional[str] = None


@dataclass
class SlurmExecutorConfig:
    type: str = "slurm"
    account: Optional[str] = None
    partition: Optional[str] = None
    nodes: int = 1
    # Processes per node; more than one (or more than one node) runs the stage under
    # torchrun, with its rendezvous on the job's first node (from SLURM_JOB_NODELIST).
    ntasks_per_node: int = 1
    # GPUs per node; 0 or null asks for none (e.g. build_db on a CPU partition).
    gpus_per_node: Optional[int] = None
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None
    time: str = "01:00:00"
    # Pyxis/enroot container; null runs on the node's own Python.
    container_image: Optional[str] = None
    container_mounts: list[str] = field(default_factory=list)
    # Python on the compute node (the one with retro_toolkit installed).
    python: str = "python"
    tunnel: TunnelConfig = field(default_factory=TunnelConfig)
    env: dict[str, str] = field(default_factory=dict)
    # Extra #SBATCH options, e.g. {qos: high, constraint: a100}.
    additional_parameters: dict[str, str] = field(default_factory=dict)
    # Per-stage overrides of the keys above (see the module docstring).
    stages: dict[str, Any] = field(default_factory=dict)


@dataclass
class DockerExecutorConfig:
    # The stage runs in a container on this machine (NeMo-Run's DockerExecutor): build
    # the image from the repository's Dockerfile (docker build -t retro-toolkit .).
    type: str = "docker"
    container_image: str = "retro-toolkit:latest"
    # Processes in the container; more than one runs the stage under torchrun.
    nproc_per_node: int = 1
    # GPUs handed to the container (-1 = all, null = none).
    num_gpus: Optional[int] = None
    # host:container bind mounts; the work directory is always mounted at the same path.
    volumes: list[str] = field(default_factory=list)
    # Shared memory for the container (data loaders and NCCL want more than Docker's 64 MB).
    shm_size: str = "16g"
    # Python inside the image.
    python: str = "python"
    env: dict[str, str] = field(default_factory=dict)
    stages: dict[str, Any] = field(default_factory=dict)


EXECUTOR_SCHEMAS: dict[str, type] = {
    "local": LocalExecutorConfig,
    "torchrun": TorchrunExecutorConfig,
    "slurm": SlurmExecutorConfig,
    "docker": DockerExecutorConfig,
}


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


def processes(executor: DictConfig) -> int:
    """How many ranks a job with these (merged) settings starts."""
    if executor.type == "slurm":
        return executor.nodes * executor.ntasks_per_node
    if executor.type in ("torchrun", "docker"):
        return executor.nproc_per_node
    return 1


def describe(executor: DictConfig) -> str:
    """One line for the plan: where a stage runs and on what."""
    if executor.type == "slurm":
        gpus = f", {executor.gpus_per_node} GPU/node" if executor.gpus_per_node else ""
        part = f" [{executor.partition}]" if executor.partition else ""
        return f"slurm{part} {executor.nodes} node(s) x {executor.ntasks_per_node} task(s){gpus}, {executor.time}"
    if executor.type == "docker":
        return f"docker {executor.container_image} x{executor.nproc_per_node}"
    if executor.type == "torchrun":
        return f"torchrun x{executor.nproc_per_node}"
    return "local"
