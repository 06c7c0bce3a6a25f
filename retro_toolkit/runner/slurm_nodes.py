"""What Slurm says of a partition's nodes, read before a job is queued and by `status`.

A job that asks for more nodes than its partition can run on does not fail: it pends
(`ReqNodeNotAvail`) until an administrator brings a node back. `check_nodes` turns that
into an error at submission that names each node and why it cannot run jobs.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

from omegaconf import DictConfig

from retro_toolkit.errors import UserError

# Base states of a node that takes jobs (sinfo %T, lowercase). A trailing "*" means slurmctld
# has not heard from the node's slurmd lately: it takes no job until it answers, which a
# node does a moment after `scontrol update state=resume`, or never if it died (then
# Slurm marks it down after SlurmdTimeout).
USABLE = ("idle", "mixed", "allocated", "completing", "planned", "reserved")


@dataclass(frozen=True)
class Node:
    name: str
    state: str
    reason: str

    @property
    def usable(self) -> bool:
        return self.state.rstrip("~#!%$@^-*") in USABLE

    @property
    def responding(self) -> bool:
        return not self.state.endswith("*")


def nodes(partition: str | None = None, names: str | None = None) -> list[Node] | None:
    """The nodes of `partition` (the default one when None), or those `names` lists; None
    when sinfo cannot tell (no Slurm here, or its controller does not answer)."""
    cmd = ["sinfo", "-h", "-N", "-o", "%N|%T|%E|%P"]
    cmd += ["-n", names] if names else (["-p", partition] if partition else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return parse_sinfo(out.stdout, default_only=partition is None and not names)


def parse_sinfo(text: str, default_only: bool = False) -> list[Node]:
    """The nodes in `sinfo -h -N -o '%N|%T|%E|%P'` output, each once (a node in several
    partitions has a line in each); `default_only`: those of the default partition."""
    found: dict[str, Node] = {}
    for line in text.splitlines():
        name, state, reason, part = (line.split("|") + ["", "", ""])[:4]
        if not name or (default_only and not part.endswith("*")):
            continue  # the default partition's name ends with '*'
        found.setdefault(name, Node(name, state, "" if reason == "none" else reason))
    return list(found.values())


def check_nodes(jobs: list[tuple[str, DictConfig]]) -> None:
    """Refuse a job that could only pend: its partition has fewer nodes that take jobs than
    it asks for. `jobs`: (stage, its merged executor settings) of each stage that will run."""
    found: dict[str | None, list[Node] | None] = {}
    for stage, executor in jobs:
        if executor.partition not in found:  # one sinfo per partition: it takes seconds to fail
            found[executor.partition] = nodes(executor.partition)
        have = found[executor.partition]
        if have is None:
            return  # the controller does not answer here: sbatch says so itself, at submission
        check_partition(have, executor, stage)


def check_partition(have: list[Node], executor: DictConfig, stage: str) -> None:
    """Refuse `stage` when fewer of the partition's nodes `have` take jobs than `executor.nodes`;
    warn when enough do but some of them have not answered the controller lately."""
    where = f"partition '{executor.partition}'" if executor.partition else "the default partition"
    if not have:
        raise UserError(f"stage {stage}: {where} has no nodes (sinfo lists none). Set executor.partition "
                        "to a partition of this cluster (`sinfo -s` lists them).")
    usable = [n for n in have if n.usable]
    if len(usable) >= executor.nodes:
        silent = [n.name for n in usable if not n.responding]
        if len(usable) - len(silent) < executor.nodes:
            it, answers = ("it", "it answers") if len(silent) == 1 else ("them", "they answer")
            print(f"warning: stage {stage}: Slurm's controller has not heard from {', '.join(silent)} lately "
                  f"(sinfo shows {it} '*'): the job waits until {answers}.", file=sys.stderr, flush=True)
        return
    down = "; ".join(f"{n.name} is {n.state}" + (f" ({n.reason})" if n.reason else "")
                     for n in have if not n.usable)
    raise UserError(
        f"stage {stage} asks for executor.nodes={executor.nodes} in {where}, which has {len(usable)} node(s) "
        f"that take jobs: {down}. The job would wait until a node returns. Bring it back "
        f"(scontrol update nodename=NODE state=resume, once it is healthy), ask for fewer nodes, "
        f"or pick another partition (executor.stages.{stage}.partition).")
