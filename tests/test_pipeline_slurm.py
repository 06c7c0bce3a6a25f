"""The smoke recipe on a real single-node Slurm cluster (started by the slurm_cluster fixture)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.conftest import CORPUS_ONLY, SMOKE
from tests.test_pipeline_local import CORPUS_FILES

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _slurm_args(cluster, workdir):
    return [f"workdir={workdir}", "executor=slurm", f"executor.partition={cluster.partition}",
            f"executor.python={sys.executable}", "executor.time=00:10:00"]


def _sacct(name: str, want: str, timeout_s: float = 30) -> list[str]:
    """Job states by name; slurmdbd records a job's end a moment after it ends."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "--name", name, "-o", "State"],
                             capture_output=True, text=True, check=True).stdout.split()
        if want in out or time.monotonic() > deadline:
            return out
        time.sleep(0.5)


def test_smoke_on_slurm_matches_local(slurm_cluster, smoke_local, tmp_path, run_cli):
    w = tmp_path / "slurm"
    p = run_cli(SMOKE, CORPUS_ONLY, *_slurm_args(slurm_cluster, w))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "[prepare_corpus] tokens:" in p.stdout  # the job's log was followed live
    for name in CORPUS_FILES:
        assert (w / "corpus" / name).read_bytes() == (smoke_local / "corpus" / name).read_bytes(), name
    assert "COMPLETED" in _sacct("retro-smoke-tokenizer", "COMPLETED")
    assert "COMPLETED" in _sacct("retro-smoke-prepare_corpus", "COMPLETED")
    # the job ran where the recipe said, through the same launch entry point
    sbatch = list((w / "logs" / "experiments").rglob("tokenizer_sbatch.sh"))
    assert sbatch and "-m retro_toolkit.launch tokenizer" in sbatch[0].read_text()


def test_torchrun_inside_slurm_is_byte_identical(slurm_cluster, smoke_local, tmp_path, run_cli):
    w = tmp_path / "slurm2"
    p = run_cli(SMOKE, CORPUS_ONLY, *_slurm_args(slurm_cluster, w), "executor.ntasks_per_node=2")
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads((w / "stages" / "prepare_corpus.json").read_text())["world_size"] == 2
    for name in CORPUS_FILES:
        assert (w / "corpus" / name).read_bytes() == (smoke_local / "corpus" / name).read_bytes(), name


def test_failed_slurm_job_exits_1_with_its_log(slurm_cluster, tmp_path, run_cli):
    w = tmp_path / "slurm_fail"
    (w / "corpus").mkdir(parents=True)
    (w / "corpus" / ".parts").write_text("in the way")
    p = run_cli(SMOKE, CORPUS_ONLY, *_slurm_args(slurm_cluster, w))
    assert p.returncode == 1, p.stdout + p.stderr
    log = w / "logs" / "prepare_corpus.rank0.log"
    assert f"stage 'prepare_corpus' failed. Its log: {log}" in p.stderr
    assert "FileExistsError" in log.read_text()
    assert "FAILED" in _sacct("retro-smoke-prepare_corpus", "FAILED")


def test_dry_run_submits_nothing(slurm_cluster, tmp_path, run_cli):
    name = f"dry{tmp_path.name[-8:]}".replace("-", "")  # job names no other test uses
    p = run_cli(SMOKE, CORPUS_ONLY, *_slurm_args(slurm_cluster, tmp_path / "dry"), f"name={name}", "--dry-run")
    assert p.returncode == 0, p.stderr
    assert "#SBATCH --time=00:10:00" in p.stdout and f"#SBATCH --partition={slurm_cluster.partition}" in p.stdout
    assert f"#SBATCH --job-name=retro-{name}-tokenizer" in p.stdout
    time.sleep(2)  # a submitted job would be in the queue or the accounting by now
    queued = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True, check=True).stdout
    assert name not in queued
    assert _sacct(f"retro-{name}-tokenizer", "never", timeout_s=0) == []
    assert not (tmp_path / "dry").exists()
