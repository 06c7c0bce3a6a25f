"""Shared test helpers: run the real `retro-run` in a subprocess, offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "recipes" / "smoke.yaml")
# The corpus stages of the smoke recipe only: the runner tests need real stages, not the
# minutes the embedder takes (tests/test_build_db.py covers build_db on a small corpus).
CORPUS_ONLY = "stages=[tokenizer,prepare_corpus]"

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def retro_run(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`retro-run ARGS` through this interpreter; returns the finished process."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        [sys.executable, "-m", "retro_toolkit", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        env=env,
        timeout=timeout,
    )


@pytest.fixture
def run_cli():
    return retro_run


# A small database: 20 pydoc topics, blocks of 100 chunks (several blocks, under a minute).
SMALL = ["data.sources=[{path: builtin:pydoc, max_docs: 20}]", "tokenizer.vocab_size=1000",
         "data.split=[0.8,0.1,0.1]", "retrieval.block_size=100", "stages=[tokenizer,prepare_corpus,build_db]"]


@pytest.fixture(scope="session")
def small_db(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("small_db") / "w"
    p = retro_run(SMOKE, f"workdir={w}", *SMALL)
    assert p.returncode == 0, p.stdout + p.stderr
    return w


@pytest.fixture(scope="session")
def smoke_local(tmp_path_factory) -> Path:
    """The smoke recipe's tokenizer + prepare_corpus, run once locally (one process)."""
    workdir = tmp_path_factory.mktemp("smoke_local") / "w"
    p = retro_run(SMOKE, CORPUS_ONLY, f"workdir={workdir}")
    assert p.returncode == 0, p.stdout + p.stderr
    return workdir


@pytest.fixture(scope="session")
def tuned(small_db, tmp_path_factory) -> Path:
    """small_db pretrained, evaluated, instruction-tuned, QA-evaluated and exported (tests/test_sft_qa.py's
    settings): a finished run whose package and database the generation and serving tests use."""
    from tests.test_pretrain import TRAIN, copy_db
    from tests.test_sft_qa import SFT

    w = copy_db(small_db, tmp_path_factory.mktemp("tuned") / "w")
    p = retro_run(SMOKE, f"workdir={w}", *SMALL, *TRAIN, *SFT,
                  "stages=[tokenizer,prepare_corpus,build_db,pretrain,eval_ppl,sft,eval_qa,export]")
    assert p.returncode == 0, p.stdout + p.stderr
    return w


@pytest.fixture(scope="session")
def dp2(small_db, tmp_path_factory) -> Path:
    """small_db pretrained and evaluated by 2 ranks on this machine (tests/test_pretrain.py's
    TRAIN): what a 2-rank run gives, which the 2-node Slurm run must repeat byte for byte."""
    from tests.test_pretrain import TRAIN, copy_db

    w = copy_db(small_db, tmp_path_factory.mktemp("dp2") / "w")
    p = retro_run(SMOKE, f"workdir={w}", *SMALL, *TRAIN, "executor=torchrun", "executor.nproc_per_node=2")
    assert p.returncode == 0, p.stdout + p.stderr
    return w


from tests.slurm_fixture import slurm_cluster, slurm_two_nodes  # noqa: E402,F401  (session fixtures)
