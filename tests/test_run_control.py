"""Run control through the real runner: a signal stops the whole run (training saves first), one
writer per work directory, a training stage's own time limit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests.conftest import REPO, SMALL, SMOKE, retro_run
from tests.test_pretrain import TRAIN, copy_db, losses

pytestmark = pytest.mark.slow

# 40 iterations of about 0.1 s: long enough to stop in the middle, short enough for CI.
RUN = [*SMALL, *TRAIN, "stages=[tokenizer,prepare_corpus,build_db,pretrain]", "pretrain.train_iters=40",
       "pretrain.save_interval=1000", "pretrain.log_interval=1"]


@pytest.fixture(scope="module")
def uninterrupted(small_db, tmp_path_factory) -> list[float]:
    w = copy_db(small_db, tmp_path_factory.mktemp("uninterrupted") / "w")
    p = retro_run(SMOKE, f"workdir={w}", *RUN)
    assert p.returncode == 0, p.stdout + p.stderr
    return losses(w)


def start(w: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.Popen([sys.executable, "-m", "retro_toolkit", SMOKE, f"workdir={w}", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def in_log(w: Path, stage: str, text: str):
    log = w / "logs" / f"{stage}.rank0.log"
    return lambda: log.exists() and text in log.read_text()


def family(proc: subprocess.Popen) -> list[psutil.Process]:
    p = psutil.Process(proc.pid)
    return [p, *p.children(recursive=True)]


def signal_and_wait(proc: subprocess.Popen, sig: int) -> tuple[int, str, list[psutil.Process], float]:
    """Send `sig` to the runner only; (exit code, stderr, its processes at that moment, seconds to end)."""
    procs = family(proc)
    t = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    gone = time.monotonic() - t
    return proc.returncode, err, procs, gone


def assert_all_gone(procs: list[psutil.Process], within: float = 10.0) -> None:
    _, alive = psutil.wait_procs(procs, timeout=within)
    assert not alive, [(p.pid, p.cmdline()) for p in alive]


@pytest.mark.parametrize("sig,executor", [(signal.SIGTERM, "local"), (signal.SIGINT, "local"),
                                          (signal.SIGTERM, "torchrun")])
def test_a_signal_to_retro_run_during_pretrain_stops_every_process_and_the_rerun_continues(
        small_db, tmp_path, uninterrupted, sig, executor):
    w = copy_db(small_db, tmp_path / "w")
    run = [*RUN] + (["executor=torchrun", "executor.nproc_per_node=2"] if executor == "torchrun" else [])
    proc = start(w, *run)
    wait_for(in_log(w, "pretrain", "iter 5/40"), "iteration 5")
    code, err, procs, seconds = signal_and_wait(proc, sig)
    assert len(procs) >= (4 if executor == "torchrun" else 2)  # runner, job (torchrun and its 2 workers)
    assert code == 128 + sig, err
    assert f"interrupted by {signal.Signals(sig).name}" in err and "Traceback" not in err
    assert_all_gone(procs)
    assert seconds < 30  # a hang guard: the stop itself takes a few seconds (over 10 s on a loaded 2-core CI)
    stopped = json.loads((w / "stages" / "pretrain.error.json").read_text())
    assert stopped["exit_code"] == 143 and 5 <= stopped["stopped_at"] < 40  # the runner passes SIGTERM on
    assert (w / "checkpoints" / "pretrain" / "latest").read_text().strip() == f"iter_{stopped['stopped_at']:07d}"
    assert not (w / "stages" / "pretrain.json").exists()  # unfinished

    p = retro_run(SMOKE, f"workdir={w}", *run)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"resuming from {w / 'checkpoints' / 'pretrain' / ('iter_%07d' % stopped['stopped_at'])}" in \
        (w / "logs" / "pretrain.rank0.log").read_text()
    if executor == "local":
        assert losses(w) == uninterrupted  # bit for bit
    else:  # two ranks sum gradients in another order than one process
        assert losses(w) == pytest.approx(uninterrupted, rel=1e-5)


def test_sigterm_during_build_db_stops_it_and_the_rerun_builds_the_same_database(small_db, tmp_path):
    from retro_toolkit.collections.retrieval import blocks
    from retro_toolkit.collections.retrieval.neighbors import load_neighbors

    w = tmp_path / "w"
    proc = start(w, *SMALL)
    emb = w / "db" / "embeddings"
    wait_for(lambda: len(list(emb.glob("*.h5"))) >= 1, "an embedding block")
    code, err, procs, seconds = signal_and_wait(proc, signal.SIGTERM)
    assert code == 143, err
    assert_all_gone(procs)
    assert seconds < 30  # a hang guard: the stop itself takes a few seconds (over 10 s on a loaded 2-core CI)
    assert not (w / "stages" / "build_db.json").exists()
    p = retro_run(SMOKE, f"workdir={w}", *SMALL)
    assert p.returncode == 0, p.stdout + p.stderr
    for f in sorted((small_db / "db" / "embeddings").glob("*.h5")):
        assert np.array_equal(blocks.read(emb / f.name), blocks.read(f)), f.name
    for split in ("train", "valid", "test"):
        assert np.array_equal(load_neighbors(w, split), load_neighbors(small_db, split)), split


def test_a_run_refuses_while_a_worker_of_another_lives_and_sigterm_to_the_worker_saves(
        small_db, tmp_path, uninterrupted):
    """Run A's runner is SIGKILLed (its worker lives on, in its own session). Run B refuses, naming
    the worker; SIGTERM to the worker saves a checkpoint at its iteration; then B runs, resumes
    from it, and repeats the uninterrupted losses bit for bit."""
    w = copy_db(small_db, tmp_path / "w")
    proc = start(w, *RUN)
    wait_for(in_log(w, "pretrain", "iter 5/40"), "iteration 5")
    worker = next(p for p in family(proc) if "retro_toolkit.launch" in " ".join(p.cmdline()))
    # Paused, so that it cannot finish its 40 iterations while run B starts up on a slow machine.
    worker.suspend()
    proc.kill()
    proc.communicate()
    assert worker.is_running()

    p = retro_run(SMOKE, f"workdir={w}", *RUN)
    assert p.returncode == 2, p.stdout + p.stderr
    assert f"pid {worker.pid} (" in p.stderr and "retro_toolkit.launch pretrain" in p.stderr
    assert "Traceback" not in p.stderr

    worker.send_signal(signal.SIGTERM)
    worker.resume()
    worker.wait(timeout=60)  # not our child: its exit code is in the error file
    stopped = json.loads((w / "stages" / "pretrain.error.json").read_text())
    assert stopped["exit_code"] == 143
    stopped = stopped["stopped_at"]
    assert (w / "checkpoints" / "pretrain" / "latest").read_text().strip() == f"iter_{stopped:07d}"
    p = retro_run(SMOKE, f"workdir={w}", *RUN)  # the worker's lock went with it
    assert p.returncode == 0, p.stdout + p.stderr
    assert losses(w) == uninterrupted


def test_exit_duration_stops_training_at_a_checkpoint_and_the_rerun_resumes(small_db, tmp_path, uninterrupted):
    w = copy_db(small_db, tmp_path / "w")
    p = retro_run(SMOKE, f"workdir={w}", *RUN, "pretrain.exit_duration_minutes=0.0001")
    assert p.returncode == 75, p.stdout + p.stderr
    assert "stopped at iteration 1 of 40 on its time limit (exit_duration_minutes)" in p.stderr
    assert (w / "checkpoints" / "pretrain" / "latest").read_text().strip() == "iter_0000001"
    # The limit is run control, not a training setting: changing it resumes the same run.
    p = retro_run(SMOKE, f"workdir={w}", *RUN)
    assert p.returncode == 0, p.stdout + p.stderr
    assert losses(w) == uninterrupted


@pytest.mark.parametrize("limit,lead", [("48:00:00", 600), ("01:00:00", 360), ("00:05:00", 30), ("30", 180),
                                        ("10:30", 63), ("2-00", 600), ("1-00:00:10", 600), ("UNLIMITED", 600)])
def test_slurm_warns_a_training_job_a_tenth_of_a_short_limit_ahead(limit, lead):
    """A job shorter than the 600 s warning would be told to stop as soon as it starts."""
    from retro_toolkit.executors.slurm import stop_warning_s

    assert stop_warning_s(limit) == lead
