"""Retro training samples from a real small database (tests/conftest.py: small_db)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from retro_toolkit.collections.retrieval import chunk_db
from retro_toolkit.collections.retrieval.neighbors import load_neighbors
from retro_toolkit.collections.retro.dataset import RetroDataset
from retro_toolkit.collections.text.token_stream import TokenStream
from retro_toolkit.errors import UserError

pytestmark = pytest.mark.slow


def _ds(w, split="train", seq=256, seed=1, **kw):
    return RetroDataset(w, split, seq, chunk_length=64, num_neighbors=2, retrieved_length=128, pad_id=0, seed=seed, **kw)


def _sample_docs(stream, start, seq):
    return set(np.searchsorted(stream.doc_offsets, np.arange(start, start + seq + 1), side="right") - 1)


def _first_k_outside(row, chunk_doc, docs, k=2):
    kept = [int(c) for c in row if c >= 0 and int(chunk_doc[c]) not in docs]
    return (kept + [-1] * k)[:k]


def test_samples_are_stream_windows_with_their_chunks_neighbours(small_db):
    ds = _ds(small_db)
    stream = TokenStream(small_db / "corpus", "train")
    nb = load_neighbors(small_db, "train")
    chunk_doc = chunk_db.load(small_db / "db" / "chunks.h5").chunk_doc
    assert len(ds) == (len(stream) - 1) // 256
    for i in range(len(ds)):
        s = ds[i]
        start = ds.window(i) * 256
        assert np.array_equal(s["tokens"], stream.tokens[start:start + 256])
        assert np.array_equal(s["labels"], stream.tokens[start + 1:start + 257])
        assert s["neighbor_tokens"].shape == (4, 2, 128)
        docs = _sample_docs(stream, start, 256)
        rows = nb[start // 64:start // 64 + 4]
        assert s["neighbor_ids"].tolist() == [_first_k_outside(row, chunk_doc, docs) for row in rows]
        missing = s["neighbor_ids"] < 0
        assert np.all(s["neighbor_tokens"][missing] == -1) and np.all(s["neighbor_tokens"][~missing][:, 0] >= 0)


def test_no_train_sample_sees_a_neighbour_from_its_own_documents(small_db):
    """Retro's rule, at two sequence lengths on one neighbour build, for every train sample."""
    stream = TokenStream(small_db / "corpus", "train")
    nb = load_neighbors(small_db, "train")
    chunk_doc = chunk_db.load(small_db / "db" / "chunks.h5").chunk_doc
    assert nb.shape[1] > 2  # more candidates than k, for samples to drop their own documents'
    for seq in (256, 1024):
        ds = _ds(small_db, seq=seq, shuffle=False)
        assert len(ds) == (len(stream) - 1) // seq
        stored_first_k_leaks = 0
        for i in range(len(ds)):
            ids, docs = ds[i]["neighbor_ids"], _sample_docs(stream, i * seq, seq)
            assert not {int(chunk_doc[c]) for c in ids[ids >= 0]} & docs, (seq, i)
            rows = nb[i * seq // 64:(i + 1) * seq // 64]
            assert ids.tolist() == [_first_k_outside(row, chunk_doc, docs) for row in rows], (seq, i)
            first_k = rows[:, :2]
            stored_first_k_leaks += bool({int(chunk_doc[c]) for c in first_k[first_k >= 0]} & docs)
        assert stored_first_k_leaks, seq  # the build-time ban alone leaks here, so the check above can fail


def test_one_neighbour_build_serves_any_seq_length_seed_and_epochs(small_db):
    a, b = _ds(small_db, seq=128, seed=1), _ds(small_db, seq=256, seed=2)
    assert len(a) == 2 * len(b) or len(a) == 2 * len(b) + 1
    order = [a.window(i) for i in range(len(a))]
    assert sorted(order) == list(range(len(a)))  # an epoch is a permutation of all windows
    assert order == [_ds(small_db, seq=128, seed=1).window(i) for i in range(len(a))]  # deterministic
    assert order != [_ds(small_db, seq=128, seed=7).window(i) for i in range(len(a))]
    two_epochs = _ds(small_db, seq=128, seed=1, num_samples=2 * len(a))
    second = [two_epochs.window(i) for i in range(len(a), 2 * len(a))]
    assert sorted(second) == list(range(len(a))) and second != order


def test_valid_split_and_decoder_only_samples(small_db):
    ds = _ds(small_db, split="valid", seq=128)
    assert ds[0]["neighbor_tokens"].shape == (2, 2, 128)
    nb = load_neighbors(small_db, "valid")
    for i in range(len(ds)):  # the database holds no valid documents: nothing is dropped
        start = ds.window(i) * 128
        assert np.array_equal(ds[i]["neighbor_ids"], nb[start // 64:start // 64 + 2, :2])
    gpt = _ds(small_db, split="valid", seq=128, with_neighbors=False)
    assert set(gpt[0]) == {"tokens", "labels"}


def test_neighbours_that_do_not_match_the_dataset_name_the_setting(small_db, tmp_path):
    with pytest.raises(UserError, match="built with chunk length 64, model.chunk_length is 32"):
        RetroDataset(small_db, "train", 256, chunk_length=32, num_neighbors=2, retrieved_length=64, pad_id=0)
    with pytest.raises(UserError, match="built with k = 2, model.num_neighbors is 3"):
        RetroDataset(small_db, "train", 256, chunk_length=64, num_neighbors=3, retrieved_length=128, pad_id=0)
    with pytest.raises(UserError, match="seq_length 100 is not a multiple of the chunk length 64"):
        _ds(small_db, seq=100)
    w = tmp_path / "w"
    shutil.copytree(small_db, w)
    meta_file = w / "neighbors" / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["num_candidates"]  # a build from before samples dropped their own documents' neighbours
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"no extra candidates per chunk\); rerun build_db .*--force build_db"):
        _ds(w)
    meta = json.loads((small_db / "neighbors" / "meta.json").read_text())
    meta["tokenizer_sha256"] = "0" * 64
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="built with another tokenizer"):
        _ds(w)
    meta = json.loads((small_db / "neighbors" / "meta.json").read_text())
    meta["splits"]["train"]["tokens"] += 5
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="cover .* tokens but the corpus has .* \\(the corpus changed\\)"):
        _ds(w)
    meta_file.unlink()
    with pytest.raises(UserError, match="run the build_db stage before training Retro"):
        _ds(w)
