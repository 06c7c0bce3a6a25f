"""Executor settings: plain data, one dataclass per executor type.

`executor.type` picks the schema, so a Slurm key under a local executor is an unknown
key, not a silently ignored one. runner/executors.py turns these into NeMo-Run objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class LocalExecutorConfig:
    # One process on this machine.
    type: str = "local"
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class TorchrunExecutorConfig:
    # N processes on this machine through torchrun (gloo on CPU, nccl on GPU).
    type: str = "torchrun"
    nproc_per_node: int = 2
    env: dict[str, str] = field(default_factory=dict)


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
    # Processes per node; more than one runs the stage under torchrun.
    ntasks_per_node: int = 1
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


EXECUTOR_SCHEMAS: dict[str, type] = {
    "local": LocalExecutorConfig,
    "torchrun": TorchrunExecutorConfig,
    "slurm": SlurmExecutorConfig,
}
