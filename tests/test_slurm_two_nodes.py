"""The smoke recipe over two Slurm nodes: each node a network namespace of this machine, whose
name resolves nowhere, so the job must find its rendezvous by address (slurm_two_nodes)."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SMALL, SMOKE
from tests.test_demo_recall import _artifacts
from tests.test_pipeline_local import CORPUS_FILES
from tests.test_pretrain import TRAIN

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STAGES = ("tokenizer", "prepare_corpus", "build_db", "pretrain", "eval_ppl")


def two_node_args(nodes, workdir: Path) -> list[str]:
    # One thread per rank, as torchrun gives each of 2 ranks on one machine: a rank with 2
    # threads sums its matmuls in another order, and the losses differ in the last bits.
    return [f"workdir={workdir}", "executor=slurm", f"executor.partition={nodes.partition}", "executor.nodes=2",
            f"executor.network_interface={nodes.interface}", f"executor.python={sys.executable}",
            "executor.time=00:10:00", "executor.env={OMP_NUM_THREADS: '1'}"]


@pytest.fixture(scope="module")
def two_nodes_run(slurm_two_nodes, tmp_path_factory, small_db):
    w = tmp_path_factory.mktemp("two_nodes") / "w"
    p = subprocess.run([sys.executable, "-m", "retro_toolkit", SMOKE, *SMALL, *TRAIN,
                        *two_node_args(slurm_two_nodes, w)], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    return w


def assert_same_database(w: Path, ref: Path) -> None:
    """db/, index/ and neighbors/ of `w` equal `ref`'s: bytes, and HDF5 by attrs and datasets."""
    a, b = _artifacts(ref), _artifacts(w)
    assert sorted(a) == sorted(b)
    for k in a:
        if isinstance(a[k], bytes):
            assert a[k] == b[k], k
        else:
            assert a[k][0] == b[k][0] and all((a[k][1][d] == b[k][1][d]).all() for d in a[k][1]), k


def wait_until_idle(partition: str, timeout: float = 150) -> list[str]:
    """Wait until every node of `partition` is idle and answers slurmctld (no '*': a node
    resumed or back on the network answers at slurmctld's next ping); their states."""
    deadline = time.monotonic() + timeout
    while True:
        states = subprocess.run(["sinfo", "-h", "-N", "-p", partition, "-o", "%T"], capture_output=True,
                                text=True).stdout.split()
        if (states and all(s == "idle" for s in states)) or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def _job_nodes(w: Path, stage: str) -> str:
    """The nodes the stage's job ran on (its id is in its log's name, log-<job name>_<id>_<restart>.out)."""
    log = next((w / "logs" / "experiments").rglob(f"log-retro-smoke-{stage}_*.out"))
    job = re.fullmatch(rf"log-retro-smoke-{stage}_(\d+)_\d+\.out", log.name).group(1)
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "NodeList"], capture_output=True,
                         text=True, check=True)
    return out.stdout.strip()


def test_every_stage_runs_on_both_nodes_as_two_ranks(two_nodes_run, slurm_two_nodes):
    w = two_nodes_run
    for stage in STAGES:
        manifest = json.loads((w / "stages" / f"{stage}.json").read_text())
        assert manifest["world_size"] == 2, stage
        assert _job_nodes(w, stage) == "rtnode[1-2]", stage
    # each node's torchrun was pointed at the first node by address, not by a name that does not resolve
    logs = "".join(p.read_text() for p in (w / "logs" / "experiments").rglob("log-*pretrain*.out"))
    # (both nodes' tasks write to one file, where their lines can run together)
    head = re.findall(r"\[node (\d)\] torchrun --nnodes 2 --nproc-per-node 1 --node-rank \d --rdzv-backend c10d "
                      r"--rdzv-endpoint ([\d.]+:\d+) --rdzv-id \d+ --rdzv-conf is_host=(\d) --local-addr ([\d.]+)", logs)
    assert sorted(head) == [("0", "10.213.7.11:29500", "1", "10.213.7.11"),
                            ("1", "10.213.7.11:29500", "0", "10.213.7.12")]


def test_two_nodes_write_what_one_node_writes(two_nodes_run, small_db, dp2):
    w = two_nodes_run
    for name in CORPUS_FILES:  # the corpus and the database: as one process writes them
        assert (w / "corpus" / name).read_bytes() == (small_db / "corpus" / name).read_bytes(), name
    assert_same_database(w, small_db)
    # training and evaluation: as 2 ranks on one machine write them, losses and checkpoints included
    assert (w / "metrics" / "pretrain.jsonl").read_bytes() == (dp2 / "metrics" / "pretrain.jsonl").read_bytes()
    ours, theirs = json.loads((w / "eval" / "ppl.json").read_text()), json.loads((dp2 / "eval" / "ppl.json").read_text())
    assert ours == theirs
    files = sorted(p.relative_to(dp2) for p in (dp2 / "checkpoints").rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(w) for p in (w / "checkpoints").rglob("*") if p.is_file())
    for f in files:
        if f.name == ".metadata":  # torch.distributed.checkpoint's index: it names its own path and a random save id
            ours, theirs = (pickle.loads((d / f).read_bytes()) for d in (w, dp2))
            ours.storage_meta = theirs.storage_meta = None
            assert ours == theirs, f  # the same entries (their order is the ranks' arrival)
        else:
            assert (w / f).read_bytes() == (dp2 / f).read_bytes(), f


# ---------------------------------------------------------------- faults

def _in_namespace(pid: int, node: str) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/var/run/netns/{node}").st_ino
    except OSError:
        return False


def _job_processes(w: Path) -> list:
    """Every process of a job on the work directory `w` (torchrun, its ranks and their
    helpers), on either node: they all name the resolved recipe."""
    import psutil

    mine = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if str(w / "recipe.resolved.yaml") in " ".join(p.info["cmdline"] or []):
            mine.append(p)
    return mine


def test_a_node_killed_mid_pretrain_fails_the_stage_quickly_and_the_rerun_resumes_exactly(
        slurm_two_nodes, small_db, dp2, tmp_path):
    import psutil

    from tests.test_pretrain import copy_db, losses

    w = copy_db(small_db, tmp_path / "w")
    args = [SMOKE, *SMALL, *TRAIN, "stages=[tokenizer,prepare_corpus,build_db,pretrain]",
            *two_node_args(slurm_two_nodes, w), "executor.distributed_timeout_s=15"]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    run = subprocess.Popen([sys.executable, "-m", "retro_toolkit", *args], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    first, second = slurm_two_nodes.nodes
    # Freeze both ranks once the first checkpoint is written: nothing moves on while the
    # second node is killed, so the kill cannot land after the run has finished.
    latest = w / "checkpoints" / "pretrain" / "latest"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not latest.exists() and run.poll() is None:
        time.sleep(0.02)
    ranks = [p for p in _job_processes(w) if "retro_toolkit.launch" in " ".join(p.cmdline())
             and "torch.distributed.run" not in " ".join(p.cmdline())]
    for p in ranks:
        p.suspend()
    assert latest.exists() and latest.read_text().strip() != "iter_0000008", "the run ended before the kill"
    on_second = [p for p in _job_processes(w) if _in_namespace(p.pid, second)]
    assert any("torch.distributed.run" in " ".join(p.cmdline()) for p in on_second), on_second
    killed = time.monotonic()
    for p in on_second:  # the node's torchrun and its rank: as when the node dies
        p.kill()
    for p in ranks:
        if p.is_running():
            p.resume()
    out, _ = run.communicate(timeout=300)
    took = time.monotonic() - killed
    print(f"node killed: retro-run exited {took:.1f} s later")
    assert run.returncode == 1, out
    # Within the recipe's distributed timeout (15 s), and in fact at once: the rank left on
    # the first node finds its peer's sockets closed, and srun ends the step it can reach.
    assert took < 15, (took, out)
    assert re.search(r"pretrain\s+failed", out) and "stage 'pretrain' failed" in out, out
    assert not (w / "stages" / "pretrain.json").exists()
    assert "It ran as 2 ranks on 2 node(s)" in out, out
    st = subprocess.run([sys.executable, "-m", "retro_toolkit", "status", str(w)], capture_output=True, text=True)
    assert st.returncode == 0, st.stdout + st.stderr
    assert "pretrain: 2 ranks on 2 node(s)" in st.stdout, st.stdout
    for rank, node in enumerate((first, second)):
        assert re.search(rf"^  {node}\s+(idle|mixed|allocated|completing)\s+{rank}\s+{w}/logs/pretrain.rank{rank}.log ",
                         st.stdout, flags=re.M), st.stdout
    deadline = time.monotonic() + 15  # Slurm's step daemons reap what is left of a failed step
    while _job_processes(w) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _job_processes(w) == [], "a process of the failed job outlived it"
    assert not psutil.pid_exists(run.pid)

    resumed_from = latest.read_text().strip()
    p = subprocess.run([sys.executable, "-m", "retro_toolkit", *args], capture_output=True, text=True, env=env,
                       timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"resuming from {w / 'checkpoints' / 'pretrain' / resumed_from}" in (w / "logs" / "pretrain.rank0.log").read_text()
    assert losses(w) == losses(dp2)  # every iteration, bit for bit, as the uninterrupted 2-rank run


def test_a_node_down_before_submission_is_named_and_nothing_is_queued(slurm_two_nodes, tmp_path, run_cli):
    first, second = slurm_two_nodes.nodes
    w = tmp_path / "w"
    args = [SMOKE, *SMALL, *two_node_args(slurm_two_nodes, w)]
    subprocess.run(["scontrol", "update", f"nodename={second}", "state=down", "reason=PSU failure"], check=True)
    try:
        for cmd in (["validate", *args], args):
            p = run_cli(*cmd)
            assert p.returncode == 2, p.stdout + p.stderr
            assert (f"asks for executor.nodes=2 in partition '{slurm_two_nodes.partition}', which has 1 node(s) "
                    f"that take jobs: {second} is down (PSU failure)") in p.stderr, p.stderr
            assert "state=resume" in p.stderr
        assert not w.exists()  # refused before the work directory or any job existed
        queued = subprocess.run(["squeue", "-h", "-p", slurm_two_nodes.partition], capture_output=True, text=True)
        assert queued.stdout.strip() == ""
        # One node is enough for a one-node job: only what cannot run is refused.
        p = run_cli("validate", *args, "executor.nodes=1")
        assert p.returncode == 0, p.stderr
    finally:
        subprocess.run(["scontrol", "update", f"nodename={second}", "state=resume"], check=True)
        assert wait_until_idle(slurm_two_nodes.partition) == ["idle", "idle"]


def test_the_link_cut_mid_build_db_fails_the_job_within_the_timeout_and_the_rerun_builds_the_same_database(
        slurm_two_nodes, small_db, tmp_path):
    from retro_toolkit.collections.retrieval import blocks

    from tests.test_pretrain import copy_db

    first, second = slurm_two_nodes.nodes
    w = copy_db(small_db, tmp_path / "w")  # its tokenizer and corpus; build_db runs again
    for done in ("db", "index", "neighbors"):
        shutil.rmtree(w / done)
    for f in (w / "stages").glob("build_db.*"):
        f.unlink()
    args = [SMOKE, *SMALL, *two_node_args(slurm_two_nodes, w), "executor.distributed_timeout_s=15"]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    run = subprocess.Popen([sys.executable, "-m", "retro_toolkit", *args], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    emb = w / "db" / "embeddings"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and run.poll() is None and not any(emb.glob("*.h5")):
        time.sleep(0.05)
    veth = f"veth-{second}"  # the second node's cable to the bridge, on this machine's side
    subprocess.run(["ip", "link", "set", veth, "down"], check=True)
    cut = time.monotonic()
    try:
        out, _ = run.communicate(timeout=400)
        took = time.monotonic() - cut
        print(f"link cut: retro-run exited {took:.1f} s later")
        assert run.returncode == 1, out
        assert re.search(r"build_db\s+failed", out), out
        assert not (w / "stages" / "build_db.json").exists()
        # Nothing closed the sockets: the ranks waited the recipe's 15 s, then gave up. srun
        # then waits 60 s for the other node's task (--wait=60) and Slurm's KillWait (10 s
        # here) for its step to end, before the job ends: about 90 s in all.
        assert 15 <= took < 180, (took, out)
        for f in w.rglob("[0-9]*-[0-9]*.h5"):  # every block file there is whole: written, then renamed
            assert blocks.read(f) is not None, f
        # The cut-off node's processes end by themselves (its rank loses the job's store),
        # before the link returns: a node that never comes back holds no ranks.
        deadline = time.monotonic() + 240
        while _job_processes(w) and time.monotonic() < deadline:
            time.sleep(1)
        left = [(p.pid, " ".join(p.cmdline())[:80]) for p in _job_processes(w)]
        assert left == [], left
        for r in (0, 1):  # each rank says why it gave up: a collective's or the watch's timeout
            log = (w / "logs" / f"build_db.rank{r}.log").read_text()
            assert re.search(r"Timed out waiting 15000ms|has not been heard from for 1\d s|no answer from the job's "
                             r"store at [\d.:]+ for 1\d s", log), log[-3000:]
    finally:
        subprocess.run(["ip", "link", "set", veth, "up"], check=True)
    # The node answers slurmctld again at its next ping (every 100 s); an operator's resume
    # pings it at once.
    subprocess.run(["scontrol", "update", f"nodename={second}", "state=down", "reason=link restored"], check=True)
    subprocess.run(["scontrol", "update", f"nodename={second}", "state=resume"], check=True)
    assert wait_until_idle(slurm_two_nodes.partition) == ["idle", "idle"]
    p = subprocess.run([sys.executable, "-m", "retro_toolkit", *args], capture_output=True, text=True, env=env,
                       timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_same_database(w, small_db)
