"""The smoke recipe on a real single-node Slurm cluster (started by the slurm_cluster fixture)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.conftest import CORPUS_ONLY, SMALL, SMOKE
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


# The smoke recipe on its 20-topic database with a few steps per training stage: every
# stage, each a Slurm job, in about two minutes.
SMALL_PIPELINE = [*SMALL, "stages=[tokenizer,prepare_corpus,build_db,pretrain,eval_ppl,sft,eval_qa,export]",
                  "model.seq_length=128", "pretrain.train_iters=4", "pretrain.micro_batch_size=2",
                  "pretrain.global_batch_size=4", "pretrain.lr_warmup_iters=0", "pretrain.save_interval=0",
                  "pretrain.log_interval=2", "eval_ppl.max_samples=4", "sft.train_iters=2", "sft.micro_batch_size=2",
                  "sft.global_batch_size=4", "sft.log_interval=1",
                  "eval_qa.tasks=[{name: smoke, path: 'builtin:smoke-qa', max_samples: 4}]", "eval_qa.max_new_tokens=4"]
ALL_STAGES = ["tokenizer", "prepare_corpus", "build_db", "pretrain", "eval_ppl", "sft", "eval_qa", "export"]


def _dependency(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%E"], capture_output=True, text=True).stdout.strip()


def test_detached_pipeline_runs_as_dependent_jobs_and_status_follows_it(slurm_cluster, tmp_path, run_cli):
    w = tmp_path / "detached"
    p = run_cli(SMOKE, *SMALL_PIPELINE, *_slurm_args(slurm_cluster, w), "--detach")
    assert p.returncode == 0, p.stdout + p.stderr
    jobs = json.loads((w / "slurm_jobs.json").read_text())["jobs"]
    assert list(jobs) == ALL_STAGES or sorted(jobs) == sorted(ALL_STAGES)
    for stage in ALL_STAGES:
        assert f"submitted {stage:<15} job {jobs[stage]['job_id']}" in p.stdout
    assert jobs["export"]["after"] == ["pretrain", "sft"] and jobs["eval_qa"]["after"] == ["sft"]
    # The runner returned while the chain waits in Slurm: export still waits on sft and pretrain.
    dep = _dependency(jobs["export"]["job_id"])
    assert f"afterok:{jobs['sft']['job_id']}" in dep and f"afterok:{jobs['pretrain']['job_id']}" in dep, dep
    # A second run over the same work directory is refused while the chain is queued.
    again = run_cli(SMOKE, *SMALL_PIPELINE, *_slurm_args(slurm_cluster, w), "--detach")
    assert again.returncode == 2 and "still queued or running" in again.stderr, again.stdout + again.stderr

    st = run_cli("status", str(w), "--wait", "--timeout", "900")
    assert st.returncode == 0, st.stdout + st.stderr
    rows = {line.split()[0]: line.split() for line in st.stdout.splitlines()[2:] if line.strip()}
    for stage in ALL_STAGES:
        assert rows[stage][1] == jobs[stage]["job_id"] and rows[stage][2] == "COMPLETED", st.stdout
        assert rows[stage][4] == "done" and rows[stage][5] == str(w / "logs" / f"{stage}.rank0.log")
    for stage in ALL_STAGES:
        assert "COMPLETED" in _sacct(f"retro-smoke-{stage}", "COMPLETED")
    assert (w / "export" / "smoke.nemo").is_file() and json.loads((w / "eval" / "ppl.json").read_text())

    # Everything is done: a rerun submits nothing.
    p = run_cli(SMOKE, *SMALL_PIPELINE, *_slurm_args(slurm_cluster, w), "--detach")
    assert p.returncode == 0 and "nothing to submit" in p.stdout, p.stdout + p.stderr


def test_detached_failure_cancels_downstream_and_status_says_why(slurm_cluster, tmp_path, run_cli):
    w = tmp_path / "detached_fail"
    (w / "corpus").mkdir(parents=True)
    (w / "corpus" / ".parts").write_text("in the way")
    p = run_cli(SMOKE, "stages=[tokenizer,prepare_corpus,build_db]", *_slurm_args(slurm_cluster, w), "--detach")
    assert p.returncode == 0, p.stdout + p.stderr
    st = run_cli("status", str(w), "--wait", "--timeout", "300")
    assert st.returncode == 1, st.stdout + st.stderr
    rows = {line.split()[0]: line.split() for line in st.stdout.splitlines()[2:5]}
    assert rows["tokenizer"][2] == "COMPLETED" and rows["prepare_corpus"][2] == "FAILED"
    assert rows["build_db"][2] == "CANCELLED"  # kill-on-invalid-dep: never left pending forever
    assert "prepare_corpus: FileExistsError" in st.stdout
    assert "not completed: prepare_corpus FAILED, build_db CANCELLED" in st.stdout

