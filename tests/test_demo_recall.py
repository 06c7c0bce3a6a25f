"""The demo database (gensim's Wikipedia sample, IVF index): recall@2 of the approximate
index against exact search, and a 2-process build equal to the 1-process one, file by file.

The first 15 articles (about 2.2K chunks, 6 embedding blocks of 400) keep each build near half a minute
on 2 cores; queries are the valid and test chunks. benchmarks/speed/build_db.py measures recall
over the whole corpus and every split (0.998 at IVF128, nprobe 32).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from retro_toolkit.collections.retrieval import blocks
from retro_toolkit.collections.retrieval import index as faiss_index
from retro_toolkit.core import files
from tests.conftest import REPO, retro_run

pytestmark = pytest.mark.slow

DEMO = str(REPO / "recipes" / "demo_wiki.yaml")
DEMO_15 = ["data.sources=[{path: builtin:wiki-sample, max_docs: 15}]", "retrieval.query_splits=[valid,test]",
           "retrieval.block_size=400", "data.split=[0.8,0.1,0.1]"]


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory) -> Path:
    pytest.importorskip("gensim")
    w = tmp_path_factory.mktemp("demo") / "one"
    p = retro_run(DEMO, f"workdir={w}", *DEMO_15)
    assert p.returncode == 0, p.stdout + p.stderr
    return w


def test_demo_index_recall_at_2_against_flat(demo_db):
    meta = files.read_json(demo_db / "neighbors" / "meta.json")
    assert meta["index"] == "IVF128,Flat" and meta["db_chunks"] > 2_000
    db = np.concatenate([blocks.read(f) for f in sorted((demo_db / "db" / "embeddings").glob("*.h5"))])
    queries = np.concatenate([blocks.read(f) for s in ("valid", "test")
                              for f in sorted((demo_db / "db" / "query_embeddings" / s).glob("*.h5"))])
    exact = faiss_index.make("Flat", db.shape[1])
    exact.add(db)
    _, truth = exact.search(queries, 2)
    ivf = faiss_index.load(demo_db / "index" / "IVF128,Flat" / "added.faissindex")
    faiss_index.set_nprobe(ivf, 32)
    _, got = ivf.search(queries, 2)
    recall = np.mean([len(set(a) & set(b)) / 2 for a, b in zip(got, truth)])
    assert recall >= 0.95, recall


def _artifacts(w: Path) -> dict[str, object]:
    """Every file build_db wrote, by relative path: HDF5 blocks as (attrs, datasets), the rest as bytes."""
    import h5py

    out: dict[str, object] = {}
    for f in sorted(p for d in ("db", "index", "neighbors") for p in (w / d).rglob("*") if p.is_file()):
        rel = str(f.relative_to(w))
        if f.suffix == ".h5":
            with h5py.File(f, "r") as h:
                out[rel] = (dict(h.attrs), {k: h[k][()] for k in h.keys()})
        else:
            out[rel] = f.read_bytes()
    return out


def test_two_processes_build_the_same_database_as_one(demo_db, tmp_path, run_cli):
    # Same tokenizer and corpus (copied, with their manifests); only build_db runs, on 2 ranks.
    two = tmp_path / "two"
    shutil.copytree(demo_db, two, ignore=shutil.ignore_patterns("db", "index", "neighbors", "logs", "build_db.json"))
    p = run_cli(DEMO, f"workdir={two}", *DEMO_15, "executor=torchrun", "executor.nproc_per_node=2")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "skip  tokenizer" in p.stdout and "run   build_db" in p.stdout
    assert json.loads((two / "stages" / "build_db.json").read_text())["world_size"] == 2
    a, b = _artifacts(demo_db), _artifacts(two)
    assert sorted(a) == sorted(b)
    assert sum(k.startswith("db/embeddings/") for k in a) >= 4  # blocks really were split over ranks
    for kind in ("db/chunks.h5", "db/query_embeddings/valid/", "index/IVF128,Flat/codes/",
                 "index/IVF128,Flat/trained.faissindex", "index/IVF128,Flat/added.faissindex",
                 "neighbors/test/", "neighbors/meta.json"):
        assert any(k.startswith(kind) for k in a), kind
    for k in a:
        if isinstance(a[k], bytes):
            assert a[k] == b[k], k
        else:
            (attrs_a, data_a), (attrs_b, data_b) = a[k], b[k]
            assert attrs_a == attrs_b, k
            assert data_a.keys() == data_b.keys() and all(np.array_equal(data_a[d], data_b[d]) for d in data_a), k
