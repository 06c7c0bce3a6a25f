"""Barrier latency: the watched store barrier (core/watch.py) against a gloo barrier, side by
side in one torchrun job of N ranks on this machine.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m benchmarks.speed.barrier

Two cases: every rank arrives together (the floor), and rank 0 arrives `--late-ms` after
the others (the waiting ranks' backoff decides how soon they notice). Rank 0 writes
benchmarks/results/barrier.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch.distributed as td

from retro_toolkit.core import dist


def _time(barrier, n: int, late_s: float, rank: int) -> float:
    barrier()
    t0 = time.perf_counter()
    for _ in range(n):
        if rank == 0 and late_s:
            time.sleep(late_s)
        barrier()
    return (time.perf_counter() - t0) / n - (late_s if late_s else 0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--barriers", type=int, default=200)
    p.add_argument("--late-ms", type=float, default=50.0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results" / "barrier.json"))
    a = p.parse_args()
    env = dist.init(600)
    gloo = td.new_group(backend="gloo")
    rows = {}
    for late in (0.0, a.late_ms / 1000):
        rows[f"rank0_late_{late * 1000:.0f}ms"] = {
            "store_watch": 1000 * _time(dist.barrier, a.barriers, late, env.rank),
            "gloo": 1000 * _time(lambda: td.barrier(group=gloo), a.barriers, late, env.rank),
        }
    everyone = dist.all_gather_object(rows)  # the waiting ranks see the backoff, rank 0 does not
    if env.is_main:
        worst = {case: {k: max(r[case][k] for r in everyone) for k in rows[case]} for case in rows}
        out = {"world_size": env.world_size, "barriers": a.barriers,
               "extra_wait_per_barrier_ms_slowest_rank": worst}
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out, indent=2))
    dist.shutdown()


if __name__ == "__main__":
    main()
