"""The local Slurm cluster fixture gives a working scheduler with accounting."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


pytestmark = pytest.mark.slurm


def _sh(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        ok, last = predicate()
        if ok:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last: {last!r}")


def test_node_idle(slurm_cluster):
    def idle():
        state = _sh(
            "sinfo", "-h", "-p", slurm_cluster.partition, "-n", slurm_cluster.hostname, "-o", "%T"
        ).strip()
        return state == "idle", state

    # The node takes back the CPUs of the suite's last job once slurmd reports its epilog done,
    # which has taken more than 30 s in the full suite; what holds it is named on failure.
    try:
        _wait_for(idle, 120, f"node {slurm_cluster.hostname} to be idle")
    except AssertionError as e:
        node = subprocess.run(["scontrol", "show", "node", slurm_cluster.hostname], capture_output=True, text=True)
        jobs = subprocess.run(["squeue", "-t", "all", "-w", slurm_cluster.hostname, "-o", "%i %j %T %M %R"],
                              capture_output=True, text=True)
        raise AssertionError(f"{e}\n{node.stdout}\n{jobs.stdout}") from None
    assert Path(slurm_cluster.slurm_base).is_absolute()


def test_sbatch_wrap_completes(slurm_cluster, tmp_path):
    out = tmp_path / "hi.out"
    job_id = _sh(
        "sbatch",
        "--parsable",
        "-p",
        slurm_cluster.partition,
        "-o",
        str(out),
        "--wrap",
        "echo hi",
    ).strip().split(";")[0]
    assert job_id.isdigit(), job_id

    def done():
        state = _sh("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State").strip()
        return state in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, state

    assert _wait_for(done, 60, f"job {job_id} in sacct") == "COMPLETED"
    assert out.read_text().strip() == "hi"
