"""The smoke recipe over two Slurm nodes: each node a network namespace of this machine, whose
name resolves nowhere, so the job must find its rendezvous by address (slurm_two_nodes)."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
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
    a, b = _artifacts(small_db), _artifacts(w)
    assert sorted(a) == sorted(b)
    for k in a:
        if isinstance(a[k], bytes):
            assert a[k] == b[k], k
        else:
            assert a[k][0] == b[k][0] and all((a[k][1][d] == b[k][1][d]).all() for d in a[k][1]), k
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
