"""executor: slurm — each stage as a Slurm job (NeMo-Run's SlurmExecutor), submitted with
sbatch on this machine or through ssh; several processes per job run under torchrun.

Queueing a whole pipeline of such jobs and following them is retro_toolkit/runner/slurm_jobs.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig

from retro_toolkit.executors.common import STOP_WARNING_S, distributed_timeout, job_env, launch_command, logs_root
from retro_toolkit.recipe.fields import WHY_CLUSTER, bounded

# Stages that save a checkpoint and stop on SIGTERM; the others just end, and resume anyway.
SAVES_ON_SIGNAL = ("pretrain", "sft")


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
    nodes: int = bounded(1, 1, 100_000, WHY_CLUSTER)
    # Processes per node; more than one (or more than one node) runs the stage under
    # torchrun, with its rendezvous on the job's first node (node_launch.py).
    ntasks_per_node: int = bounded(1, 1, 1024, WHY_CLUSTER)
    # GPUs per node; 0 or null asks for none (e.g. build_db on a CPU partition).
    gpus_per_node: Optional[int] = bounded(None, 0, 1024, WHY_CLUSTER)
    cpus_per_task: Optional[int] = bounded(None, 1, 100_000, WHY_CLUSTER)
    mem: Optional[str] = None
    time: str = "01:00:00"
    # Pyxis/enroot container; null runs on the node's own Python.
    container_image: Optional[str] = None
    container_mounts: list[str] = field(default_factory=list)
    # Python on the compute node (the one with retro_toolkit installed).
    python: str = "python"
    # The network interface the ranks of a multi-node job talk over (e.g. ib0, eth1, or rt0
    # on the test cluster): sets GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME unless env does.
    # null lets gloo and NCCL pick, which fails where a node's hostname does not resolve to
    # the interface the nodes share.
    network_interface: Optional[str] = None
    # Seconds a rank waits in a collective for the others before the job fails (a node
    # that died or dropped off the network); raise it for very long checkpoint writes.
    distributed_timeout_s: int = distributed_timeout()
    tunnel: TunnelConfig = field(default_factory=TunnelConfig)
    env: dict[str, str] = field(default_factory=dict)
    # Extra #SBATCH options, e.g. {qos: high, constraint: a100}.
    additional_parameters: dict[str, str] = field(default_factory=dict)
    # Per-stage overrides of the keys above (see retro_toolkit/executors/__init__.py).
    stages: dict[str, Any] = field(default_factory=dict)


def processes(cfg: DictConfig) -> int:
    return cfg.nodes * cfg.ntasks_per_node


def describe(cfg: DictConfig) -> str:
    gpus = f", {cfg.gpus_per_node} GPU/node" if cfg.gpus_per_node else ""
    part = f" [{cfg.partition}]" if cfg.partition else ""
    return f"slurm{part} {cfg.nodes} node(s) x {cfg.ntasks_per_node} task(s){gpus}, {cfg.time}"


def entrypoint(cfg: DictConfig) -> str:
    return cfg.python


def command(cfg: DictConfig, stage: str, recipe_file: str) -> tuple[str, list[str]]:
    """The module each Slurm task runs, and its arguments. Several processes: one task per
    node runs node_launch, which starts that node's torchrun (its docstring says why not
    NeMo-Run's torchrun launcher)."""
    if processes(cfg) > 1:
        return "retro_toolkit.executors.node_launch", [str(cfg.ntasks_per_node), stage, recipe_file]
    return launch_command(cfg, stage, recipe_file)


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


def _env(cfg: DictConfig) -> dict[str, str]:
    env = job_env(cfg)
    if cfg.network_interface:
        for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            env.setdefault(key, cfg.network_interface)
    return env


def _tunnel(cfg: DictConfig, recipe: DictConfig) -> Any:
    import nemo_run as run

    t = cfg.tunnel
    if t.type == "ssh":
        return run.SSHTunnel(host=t.host, user=t.user or os.environ.get("USER", ""), job_dir=t.job_dir,
                             identity=t.identity)
    return run.LocalTunnel(job_dir=str(logs_root(recipe) / "experiments"))


def build(cfg: DictConfig, recipe: DictConfig, waits: bool = False, stage: str | None = None) -> Any:
    """`waits`: the job has Slurm dependencies."""
    import nemo_run as run

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
        ntasks_per_node=1,
        gpus_per_node=cfg.gpus_per_node or None,
        cpus_per_task=cfg.cpus_per_task,
        mem=cfg.mem,
        time=cfg.time,
        container_image=cfg.container_image,
        container_mounts=list(cfg.container_mounts),
        env_vars=_env(cfg),
        additional_parameters=extra or None,
        tunnel=_tunnel(cfg, recipe),
        packager=run.Packager(),
    )
