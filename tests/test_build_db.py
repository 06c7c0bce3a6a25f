"""build_db through the real runner on a small corpus (20 pydoc topics, blocks of 100)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from retro_toolkit.collections.retrieval import blocks, chunk_db
from retro_toolkit.collections.text.token_stream import TokenStream
from tests.conftest import REPO, SMALL, SMOKE

pytestmark = pytest.mark.slow

SPLITS = ("train", "valid", "test")


def _neighbors(w: Path, split: str) -> np.ndarray:
    from retro_toolkit.collections.retrieval.neighbors import load_neighbors

    return load_neighbors(w, split)


def test_chunk_db_matches_the_train_documents(small_db):
    db = chunk_db.load(small_db / "db" / "chunks.h5")
    train = TokenStream(small_db / "corpus", "train")
    assert np.array_equal(db.doc_offsets, train.doc_offsets)
    doc_of_first = np.searchsorted(train.doc_offsets, db.chunk_start, side="right") - 1
    doc_of_last = np.searchsorted(train.doc_offsets, db.chunk_end - 1, side="right") - 1
    assert np.array_equal(doc_of_first, db.chunk_doc) and np.array_equal(doc_of_last, db.chunk_doc)
    assert not np.any(np.isin(train.tokens[np.concatenate([np.arange(s, e) for s, e in zip(db.chunk_start, db.chunk_end)])],
                              [train.meta["special_ids"]["eod"]]))


def test_neighbours_cover_every_query_chunk_and_never_leak(small_db):
    db = chunk_db.load(small_db / "db" / "chunks.h5")
    for split in SPLITS:
        stream = TokenStream(small_db / "corpus", split)
        nb = _neighbors(small_db, split)
        # 4 x model.num_neighbors candidates: samples drop those from their own documents
        assert nb.shape == (-(-len(stream) // 64), 8) and nb.dtype == np.int64
        assert nb.min() >= -1 and nb.max() < len(db)
        if split != "train":
            assert np.all(nb >= 0)  # nothing to filter: the DB holds no valid/test documents
            continue
        for i, row in enumerate(nb):
            window = np.arange(i * 64, min((i + 2) * 64, len(stream)))
            overlapping = set(np.searchsorted(stream.doc_offsets, window, side="right") - 1)
            assert not {int(db.chunk_doc[c]) for c in row if c >= 0} & overlapping, i


def test_neighbours_are_the_exact_nearest_chunks(small_db):
    """Recompute test-split neighbours by brute force from the stored embeddings."""
    from retro_toolkit.collections.retrieval.build_db import chunk_text
    from retro_toolkit.collections.retrieval.embedder import BertEmbedder
    from retro_toolkit.collections.text.tokenizer import workdir_tokenizer

    db_emb = np.concatenate([blocks.read(f) for f in sorted((small_db / "db" / "embeddings").glob("*.h5"))])
    assert len(db_emb) == len(chunk_db.load(small_db / "db" / "chunks.h5"))
    tok = workdir_tokenizer(small_db)
    test = TokenStream(small_db / "corpus", "test")
    texts = [chunk_text(tok, test.tokens[i:i + 64]) for i in range(0, len(test), 64)]
    q = BertEmbedder("builtin:all-minilm-l6-v2", batch_size=64).embed(texts)
    d2 = ((q[:, None, :] - db_emb[None, :, :]) ** 2).sum(-1)
    expect = np.argsort(d2, axis=1, kind="stable")[:, :2]
    got = _neighbors(small_db, "test")[:, :2]
    assert (got[:, 0] == expect[:, 0]).mean() == 1.0
    assert (got == expect).mean() >= 0.95  # ties between near-equal distances may swap

    # The embedder as it runs on GPUs, in bf16 (here on the CPU): the same directions, and
    # nearly always the same nearest chunk.
    import torch

    low = BertEmbedder("builtin:all-minilm-l6-v2", batch_size=64, dtype=torch.bfloat16).embed(texts)
    assert low.dtype == np.float32 and np.isfinite(low).all()
    cos = (low * q).sum(1) / np.linalg.norm(low, axis=1) / np.linalg.norm(q, axis=1)
    assert cos.min() > 0.99, cos.min()
    d2_low = ((low[:, None, :] - db_emb[None, :, :]) ** 2).sum(-1)
    assert (d2_low.argmin(1) == expect[:, 0]).mean() >= 0.9


def test_second_run_skips_build_db(small_db, run_cli):
    p = run_cli(SMOKE, f"workdir={small_db}", *SMALL)
    assert p.returncode == 0, p.stderr
    assert "skip  build_db" in p.stdout


def test_index_string_too_big_exits_2_and_keeps_the_database(small_db, tmp_path, run_cli):
    w = tmp_path / "w"
    shutil.copytree(small_db, w)
    before = (w / "neighbors" / "meta.json").read_bytes()
    p = run_cli(SMOKE, f"workdir={w}", *SMALL, "retrieval.index.string=OPQ32_64,IVF65536_HNSW8,PQ32")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "needs at least 65536 training vectors, but the database has" in p.stderr and "auto" in p.stderr
    assert (w / "neighbors" / "meta.json").read_bytes() == before


def test_sigkill_during_embedding_resumes_and_matches(small_db, tmp_path):
    w = tmp_path / "killed"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.Popen([sys.executable, "-m", "retro_toolkit", SMOKE, f"workdir={w}", *SMALL],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    emb = w / "db" / "embeddings"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(emb.glob("*.h5"))) < 2:
        time.sleep(0.1)
    done_before = {p.name for p in emb.glob("*.h5")}
    assert len(done_before) >= 2, "build_db never wrote two embedding blocks"
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and the job it started
    proc.wait()
    job = subprocess.run(["pkill", "-9", "-f", f"retro_toolkit.launch build_db {w}"], check=False)
    assert job.returncode in (0, 1)
    assert not (w / "stages" / "build_db.json").exists()

    from tests.conftest import retro_run

    p = retro_run(SMOKE, f"workdir={w}", *SMALL)
    assert p.returncode == 0, p.stdout + p.stderr
    m = json.loads((w / "stages" / "build_db.json").read_text())
    total = len(list(emb.glob("*.h5")))
    assert m["summary"]["embedding_blocks_computed"] <= total - len(done_before)  # finished blocks were kept
    for f in sorted(emb.glob("*.h5")):
        assert np.array_equal(blocks.read(f), blocks.read(small_db / "db" / "embeddings" / f.name)), f.name
    for split in SPLITS:
        assert np.array_equal(_neighbors(w, split), _neighbors(small_db, split)), split


def test_retriever_finds_a_chunk_from_its_own_text(small_db):
    from retro_toolkit.collections.retrieval.retriever import Retriever

    r = Retriever(small_db)
    text = r.chunk_text(10)
    hits = r.search([text, r.tokens[r.db.chunk_start[20]:r.db.chunk_end[20]]], k=3)
    assert hits.ids.shape == (2, 3) and hits.tokens.shape == (2, 3, 128)
    assert hits.ids[0, 0] == 10 and hits.ids[1, 0] == 20
    assert hits.distances[0, 0] <= hits.distances[0, 1] <= hits.distances[0, 2]
    own = r.tokens[r.db.chunk_start[10]:r.db.chunk_end[10]]
    assert np.array_equal(hits.tokens[0, 0, :len(own)], own)  # chunk, then its continuation


def test_inspect_commands(small_db, run_cli):
    p = run_cli("inspect", str(small_db), "stats")
    assert p.returncode == 0, p.stderr
    assert "index: Flat" in p.stdout and "neighbours test:" in p.stdout and "database:" in p.stdout
    p = run_cli("inspect", str(small_db), "chunk", "3")
    assert p.returncode == 0 and p.stdout.startswith("chunk 3: train document 0, tokens 192..256 (64)")
    p = run_cli("inspect", str(small_db), "neighbours", "valid", "0")
    assert p.returncode == 0 and "neighbour 0: chunk" in p.stdout and "neighbour 1: chunk" in p.stdout
    for args, msg in ((["chunk", "999999"], "chunk 999999 is out of range"),
                      (["neighbours", "dev", "0"], "no neighbours for split 'dev'"),
                      (["chunk", "x"], "N must be a number")):
        p = run_cli("inspect", str(small_db), *args)
        assert p.returncode == 2 and msg in p.stderr, p.stderr
    p = run_cli("inspect", str(small_db.parent), "stats")
    assert p.returncode == 2 and "has no finished build_db" in p.stderr


def test_extra_corpus_updates_the_database_without_retraining(small_db, tmp_path, run_cli):
    from retro_toolkit.collections.retrieval.retriever import Retriever

    w = tmp_path / "w"
    shutil.copytree(small_db, w)
    extra = tmp_path / "extra.jsonl"
    facts = ["The retro toolkit lighthouse keeper counts seventeen purple herons every morning at dawn.",
             "Marmalade submarines navigate the frozen canals of an imaginary city called Quillfort."]
    extra.write_text("".join(json.dumps({"text": t}) + "\n" for t in facts))
    n_before = len(chunk_db.load(w / "db" / "chunks.h5"))
    p = run_cli(SMOKE, f"workdir={w}", *SMALL, f"retrieval.extra_sources=[{{path: {extra}}}]")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "run   build_db        changed: retrieval.extra_sources" in p.stdout
    assert "reusing the trained Flat index (not retrained)" in p.stdout
    summary = json.loads((w / "stages" / "build_db.json").read_text())["summary"]
    assert summary["embedding_blocks_computed"] == 1  # only the new chunks were embedded
    db = chunk_db.load(w / "db" / "chunks.h5")
    assert db.parts[0] == "train" and db.parts[1].startswith("extra:") and len(db) == n_before + 2
    assert db.part_chunks[1] == n_before
    r = Retriever(w)
    hits = r.search(["How many purple herons does the lighthouse keeper count?"], k=1)
    assert hits.ids[0, 0] == n_before and "seventeen purple herons" in r.chunk_text(int(hits.ids[0, 0]))
    # every split was searched again against the larger index
    for split in SPLITS:
        nb = _neighbors(w, split)
        assert nb.shape == _neighbors(small_db, split).shape and nb.max() < len(db)


def test_damaged_block_is_rebuilt_and_validation_reports_identical(small_db, tmp_path, run_cli):
    w = tmp_path / "w"
    shutil.copytree(small_db, w)
    victim = sorted((w / "db" / "embeddings").glob("*.h5"))[2]
    victim.write_bytes(victim.read_bytes()[:200])  # a truncated copy
    p = run_cli(SMOKE, f"workdir={w}", *SMALL, "--force", "build_db", "retrieval.validate_fraction=1.0")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 damaged or stale embedding block(s) rebuilt" in p.stdout
    assert "all identical" in p.stdout
    summary = json.loads((w / "stages" / "build_db.json").read_text())["summary"]
    assert summary["embedding_blocks_computed"] == 1 and summary["validation_mismatches"] == 0
    assert np.array_equal(blocks.read(victim), blocks.read(small_db / "db" / "embeddings" / victim.name))
    for split in SPLITS:
        assert np.array_equal(_neighbors(w, split), _neighbors(small_db, split)), split


def test_without_kept_embeddings_the_database_is_the_same_and_no_embedding_stays_on_disk(small_db, tmp_path, run_cli):
    """keep_embeddings=false stores only the training sample's embeddings and embeds each block when
    it is encoded or searched. The sample here is every train chunk, in blocks that match the
    kept ones, so the index and every neighbour equal a build that keeps its embeddings."""
    ivf = ["retrieval.index.string=IVF16,Flat", "retrieval.index.nprobe=4"]
    kept, dropped = tmp_path / "kept", tmp_path / "dropped"
    for w, keep in ((kept, "true"), (dropped, "false")):
        shutil.copytree(small_db, w)
        p = run_cli(SMOKE, f"workdir={w}", *SMALL, *ivf, f"retrieval.keep_embeddings={keep}")
        assert p.returncode == 0, p.stdout + p.stderr
    assert "embedding the" in p.stdout and "chunks the index is trained on" in p.stdout
    assert not (dropped / "db" / "embeddings").exists() and not (dropped / "db" / "query_embeddings").exists()
    assert sum(f.stat().st_size for f in (dropped / "db" / "sample_embeddings").glob("*.h5")) > 0
    index = Path("index") / "IVF16,Flat" / "added.faissindex"
    assert (dropped / index).read_bytes() == (kept / index).read_bytes()
    for split in SPLITS:
        assert np.array_equal(_neighbors(dropped, split), _neighbors(kept, split)), split
    p = run_cli(SMOKE, f"workdir={dropped}", *SMALL, *ivf, "retrieval.keep_embeddings=false")
    assert p.returncode == 0 and "skip  build_db" in p.stdout, p.stdout + p.stderr


def test_build_db_without_a_prepared_corpus_names_the_missing_stage(tmp_path, run_cli):
    """The job entry point refuses to run build_db before prepare_corpus has finished."""
    import subprocess
    import sys

    w = tmp_path / "w"
    p = run_cli(SMOKE, f"workdir={w}", *SMALL, "--stages", "tokenizer")
    assert p.returncode == 0, p.stderr
    job = subprocess.run([sys.executable, "-m", "retro_toolkit.launch", "build_db", str(w / "recipe.resolved.yaml")],
                         capture_output=True, text=True)
    assert job.returncode == 2
    assert "stage 'build_db' needs stage 'prepare_corpus', which is not done (not run yet)" in job.stderr
    assert not (w / "db").exists()


def test_two_node_torchrun_rendezvous_builds_the_same_neighbours(small_db, tmp_path, run_cli):
    """The multi-node launch the sbatch scripts use, as two torchrun agents on this machine:
    --nnodes 2 --node-rank 0/1, c10d rendezvous on the first node, one rank per node."""
    import socket

    w = tmp_path / "two_nodes"
    shutil.copytree(small_db, w, ignore=shutil.ignore_patterns("db", "index", "neighbors", "logs", "build_db.json",
                                                               "recipe.resolved.yaml"))
    shown = run_cli("show", SMOKE, f"workdir={w}", *SMALL)
    assert shown.returncode == 0, shown.stderr
    (w / "recipe.resolved.yaml").write_text(shown.stdout)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", LOGLEVEL="WARNING")
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                                "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint",
                                f"127.0.0.1:{port}", "--rdzv-id", "retro-test", "-m", "retro_toolkit.launch", "build_db",
                                str(w / "recipe.resolved.yaml")],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for node in (0, 1)]
    outs = [a.communicate(timeout=600)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    m = json.loads((w / "stages" / "build_db.json").read_text())
    assert m["world_size"] == 2
    assert (w / "logs" / "build_db.rank1.log").is_file()  # rank 1 ran on the second "node"
    for split in SPLITS:
        assert np.array_equal(_neighbors(w, split), _neighbors(small_db, split)), split
