"""One node's part of a Slurm job of several processes: torchrun, pointed at the job's first node.

    srun --ntasks-per-node=1 python -m retro_toolkit.executors.node_launch NPROC STAGE RECIPE

Every node runs this once (one Slurm task per node). It reads its place from Slurm
(SLURM_NODEID, SLURM_NNODES, SLURM_JOB_NODELIST, SLURM_JOB_ID) and replaces itself with
torchrun: NPROC ranks on this node, rendezvous (c10d) on the first node of the job.

Why not torchrun straight from the batch script: the batch script runs on the first node
only, so it cannot give each node its own settings, and torchrun finds out whether it hosts
the rendezvous by resolving its own hostname, which fails on nodes whose names do not
resolve there. Here the first node is told that it hosts the rendezvous, and the address is
Slurm's NodeAddr for that node, an address wherever slurmctld reaches the node by one.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
from typing import Optional

from retro_toolkit.core.dist import share_cores

RDZV_PORT = 29500


def first_node(nodelist: str) -> str:
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def node_address(node: str) -> str:
    """Slurm's NodeAddr for `node` when it is an IP address, else what the name resolves to,
    else the name itself."""
    out = subprocess.run(["scontrol", "show", "node", node, "-o"], capture_output=True, text=True, check=False)
    addr = next((f.split("=", 1)[1] for f in out.stdout.split() if f.startswith("NodeAddr=")), "")
    try:
        return str(ipaddress.ip_address(addr))
    except ValueError:
        pass
    try:
        return socket.gethostbyname(addr or node)
    except OSError:
        return addr or node


def torchrun_args(nproc: int, stage: str, recipe: str, env: Optional[dict] = None,
                  addresses: Optional[tuple[str, str]] = None) -> list[str]:
    """torchrun's command line for this node. addresses: the first node's and this node's,
    found from Slurm when not given."""
    env = os.environ if env is None else env
    node_rank = int(env["SLURM_NODEID"])
    nnodes = int(env["SLURM_NNODES"])
    head, local = addresses or (node_address(first_node(env["SLURM_JOB_NODELIST"])),
                                node_address(env["SLURMD_NODENAME"]))
    endpoint = f"[{head}]:{RDZV_PORT}" if ":" in head else f"{head}:{RDZV_PORT}"
    # --local-addr: the address the first rank publishes for the workers' own store
    # (torchrun would publish its hostname).
    return ["-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node", str(nproc),
            "--node-rank", str(node_rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
            "--rdzv-id", env.get("SLURM_JOB_ID", "retro"), "--rdzv-conf", f"is_host={int(node_rank == 0)}",
            "--local-addr", local, "--max-restarts", "0", "--tee", "3", "-m", "retro_toolkit.launch", stage, recipe]


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        sys.exit("usage: python -m retro_toolkit.executors.node_launch NPROC STAGE RECIPE (inside a Slurm job)")
    args = torchrun_args(int(argv[0]), argv[1], argv[2])
    share_cores(os.environ, int(argv[0]))  # the cores of this node's allocation (its cpuset)
    print(f"[node {os.environ['SLURM_NODEID']}] torchrun {' '.join(args[2:])}", flush=True)
    os.execv(sys.executable, [sys.executable, *args])


if __name__ == "__main__":
    main()
