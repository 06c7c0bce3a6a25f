"""Index codes and neighbours do not depend on faiss's thread count (index.encode / index.search
make calls of fixed rows on one thread each), so a database is the same on any number of ranks
or cores. faiss's own sa_encode of the whole array does depend on it: on this data (the 2e6-token
case of benchmarks/scale.py), faiss 1.15.1 on 1 thread and on 2 puts 1 of the 32,181 vectors in
different lists."""

from __future__ import annotations

import numpy as np

from retro_toolkit.collections.retrieval import index as faiss_index


def _clustered(n: int, seed: int) -> np.ndarray:
    centres = np.random.default_rng(7).standard_normal((64, 64)).astype(np.float32)
    rng = np.random.default_rng(seed)
    return centres[rng.integers(0, 64, n)] + 0.3 * rng.standard_normal((n, 64), dtype=np.float32)


def test_codes_and_neighbours_are_the_same_on_one_thread_and_two():
    import faiss

    before = faiss.omp_get_max_threads()
    index = faiss_index.make("IVF31,PQ16", 64)
    faiss_index.train(index, _clustered(20_000, 10**9), use_gpu=False)
    x = _clustered(32_181, 0)
    try:
        got = []
        for threads in (1, 2):
            faiss.omp_set_num_threads(threads)
            codes = faiss_index.encode(index, x)
            faiss_index.add_codes(filled := faiss.deserialize_index(faiss.serialize_index(index)), codes, np.arange(len(codes)))
            faiss_index.set_nprobe(filled, 4)
            got.append((codes, *faiss_index.search(filled, x[:6000], 10)))
        faiss.omp_set_num_threads(1)  # what each call computes: fixed rows, one thread
        want = np.concatenate([index.sa_encode(x[i:i + faiss_index.ROWS_PER_CALL])
                               for i in range(0, len(x), faiss_index.ROWS_PER_CALL)])
    finally:
        faiss.omp_set_num_threads(before)
    (c1, d1, i1), (c2, d2, i2) = got
    assert c1.shape == (len(x), 17) and np.array_equal(c1, want)
    assert np.array_equal(c1, c2)
    assert np.array_equal(i1, i2) and np.array_equal(d1, d2)
    assert (i1 >= 0).all()
    assert faiss_index.encode(index, x[:0]).shape == (0, 17)


def test_threads_follow_the_cores_this_process_may_use_not_the_machines():
    """Under a Slurm cpuset or `taskset` (here: an affinity of one core), faiss and the embedder
    take the cores the process may use, shared by the node's ranks."""
    import os
    import subprocess
    import sys

    import pytest

    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs Linux affinity and 2 usable cores")
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); import faiss; "
            "from retro_toolkit.collections.retrieval import index; "
            "from retro_toolkit.core.dist import cpus_per_rank; "
            "index.set_threads(1); print(faiss.omp_get_max_threads(), cpus_per_rank(1), cpus_per_rank(2))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["1", "1", "1"]
    # The machine's cores without a mask; OMP_NUM_THREADS, where set, wins, as it does for torch.
    code = ("import os; from retro_toolkit.core.dist import cpus_per_rank as c; "
            "print(len(os.sched_getaffinity(0)), c(1), c(10**6))")
    for omp, want in ((None, lambda n: [n, 1]), ("3", lambda n: [3, 3]), ("x", lambda n: [n, 1])):
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env=env if omp is None else {**env, "OMP_NUM_THREADS": omp})
        assert p.returncode == 0, p.stderr
        n, *got = (int(x) for x in p.stdout.split())
        assert got == want(n), (omp, p.stdout)


def test_torchrun_ranks_share_the_cores_unless_the_job_sets_omp_num_threads(tmp_path, monkeypatch):
    """torchrun alone gives each of several ranks 1 thread; the runner's torchrun jobs get the
    usable cores shared by the ranks, and an OMP_NUM_THREADS of the executor's env or of the
    caller's stays."""
    import sys

    from omegaconf import OmegaConf

    from retro_toolkit.core.dist import share_cores, usable_cpus
    from retro_toolkit.runner.local_job import run_job

    n = usable_cpus()
    env: dict[str, str] = {}
    share_cores(env, 1)
    assert env == {}  # one rank: torchrun sets nothing, torch takes every core
    share_cores(env, 2)
    assert env == {"OMP_NUM_THREADS": str(max(1, n // 2))}
    share_cores(env, 10**6)
    assert env == {"OMP_NUM_THREADS": str(max(1, n // 2))}  # set already: kept
    env = {}
    share_cores(env, 10**6)
    assert env == {"OMP_NUM_THREADS": "1"}

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    show = [sys.executable, "-c", "import os; print('threads=' + os.environ.get('OMP_NUM_THREADS', 'unset'))"]
    for kind, extra, want in (("torchrun", {}, str(max(1, n // 2))), ("torchrun", {"OMP_NUM_THREADS": "5"}, "5"),
                              ("local", {}, "unset")):
        cfg = OmegaConf.create({"type": kind, "nproc_per_node": 2, "env": extra})
        out = tmp_path / f"{kind}{len(extra)}.out"
        assert run_job(cfg, show, out) == "SUCCEEDED"
        assert f"threads={want}\n" in out.read_text(), (kind, extra, out.read_text())
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    out = tmp_path / "caller.out"
    assert run_job(OmegaConf.create({"type": "torchrun", "nproc_per_node": 2, "env": {}}), show, out) == "SUCCEEDED"
    assert "threads=7\n" in out.read_text()
