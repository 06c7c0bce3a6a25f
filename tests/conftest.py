"""Shared test helpers: run the real `retro-run` in a subprocess, offline."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from retro_toolkit.core.cpu import before_megatron
from retro_toolkit.core.dist import usable_cpus

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "recipes" / "smoke.yaml")
# The corpus stages of the smoke recipe only: the runner tests need real stages, not the
# minutes the embedder takes (tests/test_build_db.py covers build_db on a small corpus).
CORPUS_ONLY = "stages=[tokenizer,prepare_corpus]"

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# With a pytest-xdist worker per core, torch in each worker and in each job it starts computes on
# one thread: two workers of two threads each on two cores mostly wait for each other (the
# in-process training tests ran 2.9 times slower). Set before any test module imports torch.
if os.environ.get("PYTEST_XDIST_WORKER") and \
        int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) >= usable_cpus():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
before_megatron()  # the megatron-core these tests import, as the jobs import it


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


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """`name`/w, built by `build` once per test run: under pytest-xdist, the first worker to ask
    builds it while the others wait on a lock, then all of them read the same folder."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the run's folder, shared
    out = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "built").exists():  # absent or half-built by a worker whose build failed
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            build(out / "w")
            (out / "built").touch()
    return out / "w"


def _run_ok(*args: str) -> None:
    p = retro_run(*args)
    assert p.returncode == 0, p.stdout + p.stderr


# A small database: 20 pydoc topics, blocks of 100 chunks (several blocks, under a minute).
SMALL = ["data.sources=[{path: builtin:pydoc, max_docs: 20}]", "tokenizer.vocab_size=1000",
         "data.split=[0.8,0.1,0.1]", "retrieval.block_size=100", "stages=[tokenizer,prepare_corpus,build_db]"]


@pytest.fixture(scope="session")
def small_db(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "small_db", lambda w: _run_ok(SMOKE, f"workdir={w}", *SMALL))


@pytest.fixture(scope="session")
def smoke_local(tmp_path_factory) -> Path:
    """The smoke recipe's tokenizer + prepare_corpus, run once locally (one process)."""
    return built_once(tmp_path_factory, "smoke_local", lambda w: _run_ok(SMOKE, CORPUS_ONLY, f"workdir={w}"))


@pytest.fixture(scope="session")
def tuned(small_db, tmp_path_factory) -> Path:
    """small_db pretrained, evaluated, instruction-tuned, QA-evaluated and exported (tests/test_sft_qa.py's
    settings): a finished run whose package and database the generation and serving tests use."""
    from tests.test_pretrain import TRAIN, copy_db
    from tests.test_sft_qa import SFT

    def build(w: Path) -> None:
        copy_db(small_db, w)
        _run_ok(SMOKE, f"workdir={w}", *SMALL, *TRAIN, *SFT,
                "stages=[tokenizer,prepare_corpus,build_db,pretrain,eval_ppl,sft,eval_qa,export]")

    return built_once(tmp_path_factory, "tuned", build)


@pytest.fixture(scope="session")
def dp2(small_db, tmp_path_factory) -> Path:
    """small_db pretrained and evaluated by 2 ranks on this machine (tests/test_pretrain.py's
    TRAIN): what a 2-rank run gives, which the 2-node Slurm run must repeat byte for byte."""
    from tests.test_pretrain import TRAIN, copy_db

    def build(w: Path) -> None:
        copy_db(small_db, w)
        _run_ok(SMOKE, f"workdir={w}", *SMALL, *TRAIN, "executor=torchrun", "executor.nproc_per_node=2")

    return built_once(tmp_path_factory, "dp2", build)


# Under pytest-xdist (pyproject's addopts: `-n auto`), each test file is one unit of work, so its
# module fixtures are built once, and the files that use the Slurm cluster are one unit: one
# cluster per machine, started by the worker that runs them. Units are handed out in collection
# order, so the longest go first and the workers end together; the seconds are a serial run's on
# 2 cores.
SLURM_FILES = {"test_pipeline_slurm.py", "test_slurm_fixture.py", "test_slurm_two_nodes.py"}
LONGEST_FIRST = {"slurm": 420, "test_pretrain.py": 350, "test_examples.py": 215, "test_run_control.py": 200,
                 "test_build_db.py": 150, "test_demo_recall.py": 130, "test_db_update.py": 130,
                 "test_single_gpu_recipe.py": 90, "test_full_size_recipes.py": 78, "test_sft_qa.py": 68,
                 "test_bad_input.py": 56, "test_corpus_formats.py": 53, "test_ivf_fill.py": 52}


def unit_of(nodeid: str) -> str:
    """The unit of work a test belongs to: "slurm", or its file's name."""
    name = Path(nodeid.split("::")[0]).name
    return "slurm" if name in SLURM_FILES else name


def pytest_collection_modifyitems(config, items):
    strays = sorted({item.path.name for item in items if "slurm_cluster" in getattr(item, "fixturenames", ())
                     and item.path.name not in SLURM_FILES})
    if strays:
        raise pytest.UsageError(f"{', '.join(strays)} use(s) the Slurm cluster: add to SLURM_FILES in tests/conftest.py")
    items.sort(key=lambda item: -LONGEST_FIRST.get(unit_of(item.nodeid), 0))  # stable: file order kept otherwise


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: the cores this process may run on (xdist would count the host's), at most 4."""
    return min(4, usable_cpus())


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    return ByUnit(config, log)


from tests.slurm_fixture import slurm_cluster, slurm_two_nodes  # noqa: E402,F401  (session fixtures)
