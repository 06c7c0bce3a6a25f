"""Retrieval invariants on synthetic data: chunking, neighbour filtering, continuations,
index sizing, resumable blocks. Fast; tests/test_build_db.py runs the real stage."""

from __future__ import annotations

import numpy as np
import pytest

from retro_toolkit.collections.retrieval import blocks, chunk_db, neighbors
from retro_toolkit.collections.retrieval import index as faiss_index
from retro_toolkit.errors import UserError

EOD, PAD = 3, 0


def _stream(doc_lengths, seed=0):
    """A token stream of documents (content tokens >= 10) each followed by EOD."""
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(10, 1000, n), EOD) for n in doc_lengths]
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    return np.concatenate(docs).astype(np.int64), offsets


@pytest.mark.parametrize("lengths", [[1], [64], [65], [130, 3, 64, 200, 1], list(range(1, 300, 7))])
def test_chunks_never_cross_documents_and_cover_every_content_token(lengths):
    tokens, offsets = _stream(lengths)
    doc, start, end = chunk_db.cut_chunks(offsets, 64)
    assert np.all(end > start) and np.all(end - start <= 64)
    assert np.all(start >= offsets[doc]) and np.all(end <= offsets[doc + 1] - 1)  # inside, EOD excluded
    covered = np.zeros(len(tokens), dtype=int)
    for s, e in zip(start, end):
        covered[s:e] += 1
    assert np.all(covered[tokens != EOD] == 1) and np.all(covered[tokens == EOD] == 0)
    assert len(doc) == sum(-(-n // 64) for n in lengths)


def _db(lengths, m=64):
    tokens, offsets = _stream(lengths)
    doc, start, end = chunk_db.cut_chunks(offsets, m)
    return tokens, chunk_db.ChunkDB(doc, start, end, offsets, m, ["train"], np.array([0, len(tokens)]),
                                    np.array([0, len(doc)]))


def test_continuation_stays_in_the_document_and_pads():
    tokens, db = _db([100, 50, 200])
    out = chunk_db.neighbor_tokens(db, tokens, np.array([[0, 1], [2, 3]]), r=128, pad_id=PAD)
    assert out.shape == (2, 2, 128)
    # chunk 0: doc 0 tokens 0..99, then pad (never doc 1's tokens, never EOD)
    assert np.array_equal(out[0, 0, :100], tokens[:100]) and np.all(out[0, 0, 100:] == PAD)
    # chunk 1 is doc 0's second chunk (tokens 64..99): 36 tokens then pad
    assert np.array_equal(out[0, 1, :36], tokens[64:100]) and np.all(out[0, 1, 36:] == PAD)
    # chunk 2 is doc 1 (50 tokens)
    assert np.array_equal(out[1, 0, :50], tokens[101:151]) and np.all(out[1, 0, 50:] == PAD)
    # chunk 3 is doc 2's first chunk: a full 128-token continuation inside doc 2
    assert np.array_equal(out[1, 1], tokens[152:280])


def test_missing_neighbours_stay_minus_one_and_are_never_read():
    tokens, db = _db([100, 50])
    ids = np.array([[-1, 1], [-1, -1]])
    out = chunk_db.neighbor_tokens(db, tokens, ids, r=128, pad_id=PAD)
    assert np.all(out[0, 0] == -1) and np.all(out[1] == -1)
    assert not np.any(np.isin(out[ids == -1], tokens[-5:]))  # no wrap to the stream's end


def test_filter_drops_documents_overlapping_the_chunk_or_the_next():
    m, k = 64, 2
    tokens, offsets = _stream([90, 30, 300, 10, 120])
    db_doc, _, _ = chunk_db.cut_chunks(offsets, m)
    nq = neighbors.num_query_chunks(len(tokens), m)
    rng = np.random.default_rng(1)
    cand = np.stack([rng.permutation(len(db_doc)) for _ in range(nq)])[:, :8]
    cand[0, 3] = -1  # faiss returns -1 when it has fewer results
    lo, hi = neighbors.banned_doc_range(offsets, len(tokens), 0, nq, m)
    kept = neighbors.filter_candidates(cand, db_doc[np.clip(cand, 0, None)], lo, hi, k)
    assert kept.shape == (nq, k)
    for i in range(nq):
        window = slice(i * m, min((i + 2) * m, len(tokens)))
        overlapping = set(np.searchsorted(offsets, np.arange(len(tokens))[window], side="right") - 1)
        allowed = [c for c in cand[i] if c >= 0 and db_doc[c] not in overlapping]
        expect = (allowed + [-1] * k)[:k]
        assert kept[i].tolist() == expect, i


def test_filter_without_overlap_keeps_rank_order():
    cand = np.array([[5, 3, 9], [2, -1, 7]])
    kept = neighbors.filter_candidates(cand, cand, None, None, 2)
    assert kept.tolist() == [[5, 3], [2, 7]]


def test_sample_filter_keeps_the_first_k_outside_the_sample_documents_in_rank_order():
    offsets = np.array([0, 100, 150, 400, 1000])  # documents 0..3
    assert neighbors.sample_doc_range(offsets, 0, 100) == (0, 0)
    assert neighbors.sample_doc_range(offsets, 0, 101) == (0, 1)  # seq_length + 1 tokens reach document 1
    assert neighbors.sample_doc_range(offsets, 128, 129) == (1, 2)
    chunk_doc = np.array([0, 0, 1, 1, 2, 2, 3, 3, 3, 3])
    cand = np.array([[7, 3, 9, 4, 1], [2, -1, 8, 6, 5], [3, 9, -1, -1, -1], [5, 4, 2, 3, -1]])
    kept = neighbors.filter_candidates(cand, chunk_doc[np.clip(cand, 0, None)], 1, 2, 2)
    assert kept.tolist() == [[7, 9], [8, 6], [9, -1], [-1, -1]]
    assert neighbors.filter_candidates(cand, chunk_doc[np.clip(cand, 0, None)], None, None, 2).tolist() == [
        [7, 3], [2, 8], [3, 9], [5, 4]]


def test_default_candidates_are_a_few_times_k_within_k_query():
    assert neighbors.num_candidates(None, 2, 200) == 8
    assert neighbors.num_candidates(None, 2, 5) == 5
    assert neighbors.num_candidates(3, 2, 200) == 3


@pytest.mark.parametrize(
    "string, need", [("Flat", 1), ("IVF4096,Flat", 4096), ("OPQ32_64,IVF65536_HNSW8,PQ32", 65536), ("PQ16x4", 16), ("HNSW32", 1)]
)
def test_min_train_points(string, need):
    assert faiss_index.min_train_points(string) == need


def test_index_string_too_big_is_a_clear_error():
    with pytest.raises(UserError, match=r"needs at least 65536 training vectors, but the database has 1800 chunks.*=auto"):
        faiss_index.check_fits("OPQ32_64,IVF65536_HNSW8,PQ32", 1800)


@pytest.mark.parametrize("n", [50, 10_800, 99_999, 2_000_000, 50_000_000])
def test_auto_index_string_is_trainable_and_buildable(n):
    string = faiss_index.auto_string(n, 384, memory_gb=8)
    assert faiss_index.min_train_points(string) <= n
    faiss_index.make(string, 384)  # faiss accepts it
    if n < 100_000:
        assert string == "Flat"
    else:
        assert "IVF" in string
    if n * 384 * 4 > 8 * 2**30:
        assert "PQ" in string  # compressed when flat vectors would not fit the budget


def test_auto_flat_search_is_exact():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 16)).astype(np.float32)
    idx = faiss_index.make(faiss_index.auto_string(50, 16, 1), 16)
    idx.add(x)
    _, ids = idx.search(x, 1)
    assert ids[:, 0].tolist() == list(range(50))


def test_bad_factory_string():
    with pytest.raises(UserError, match="is not a faiss factory string"):
        faiss_index.make("IVFbanana", 16)


SPANS = blocks.ranges(25, 10)


def test_block_ranges_respect_part_boundaries():
    assert SPANS == [(0, 10), (10, 20), (20, 25)]
    assert blocks.ranges(25, 10, boundaries=[17]) == [(0, 10), (10, 17), (17, 25)]
    # rows added after a boundary leave the blocks before it unchanged
    assert blocks.ranges(40, 10, boundaries=[17])[:2] == [(0, 10), (10, 17)]


def test_database_parts_keep_train_ids_and_read_across_streams():
    train, t_off = _stream([100, 30])
    extra, e_off = _stream([70], seed=5)
    db_train = chunk_db.cut_chunks(t_off, 64)
    from pathlib import Path
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        db = chunk_db.build([chunk_db.Part("train", t_off), chunk_db.Part("extra", e_off)], 64, Path(d) / "chunks.h5")
        assert chunk_db.load(Path(d) / "chunks.h5").parts == ["train", "extra"]
    n_train = len(db_train[0])
    assert np.array_equal(db.chunk_start[:n_train], db_train[1])  # train chunk ids unchanged
    assert db.part_chunks.tolist() == [0, n_train, len(db)]
    tokens = chunk_db.PartTokens([train, extra], db.part_tokens)
    first_extra = n_train
    out = chunk_db.neighbor_tokens(db, tokens, np.array([first_extra, 0]), r=128, pad_id=PAD)
    assert np.array_equal(out[0, :70], extra[:70]) and np.all(out[0, 70:] == PAD)
    assert np.array_equal(out[1, :100], train[:100])
    assert np.array_equal(tokens[int(db.chunk_start[first_extra]):int(db.chunk_end[first_extra])], extra[:64])


def test_blocks_resume_detect_damage_and_stale_keys(tmp_path):
    calls = []

    def compute(s, e):
        calls.append((s, e))
        return np.arange(s, e, dtype=np.float32)[:, None].repeat(3, 1)

    assert blocks.compute_missing(tmp_path, 25, SPANS, compute, "k1") == {"computed": 3, "reused": 0, "rebuilt": 0}
    assert calls == [(0, 10), (10, 20), (20, 25)]
    calls.clear()
    assert blocks.compute_missing(tmp_path, 25, SPANS, compute, "k1") == {"computed": 0, "reused": 3, "rebuilt": 0}
    assert calls == []
    # a truncated block (a copy cut short, a full disk) is detected and rebuilt
    p = blocks.path(tmp_path, 10, 20, 25)
    p.write_bytes(p.read_bytes()[:100])
    assert blocks.compute_missing(tmp_path, 25, SPANS, compute, "k1")["rebuilt"] == 1
    assert calls == [(10, 20)]
    got = np.concatenate([d for _, _, d in blocks.iter_blocks(tmp_path, 25, SPANS, "k1")])
    assert np.array_equal(got[:, 0], np.arange(25))
    # another key (a changed setting) recomputes everything
    calls.clear()
    blocks.compute_missing(tmp_path, 25, SPANS, compute, "k2")
    assert len(calls) == 3
    # ranks take blocks round-robin
    calls.clear()
    blocks.compute_missing(tmp_path / "r", 25, SPANS, compute, "k", rank=1, world_size=2)
    assert calls == [(10, 20)]


def _polysemous(index):
    return getattr(faiss_index.unwrapped(index), "do_polysemous_training", None)


def test_pq_indexes_train_without_polysemous_codes_and_search_the_same():
    """faiss's factory trains polysemous codes for PQ (a centroid order for Hamming-threshold
    search, which build_db never does); make() turns that off. The codes are the same centroids
    under other numbers, so a search returns the same ids; here the distances are equal too
    (benchmarks/speed/index_train.py found PQ64's search tables rounding 4 of 40,000 apart)."""
    import faiss

    for string in ("PQ4", "OPQ4,PQ4", "IVF16,PQ4", "OPQ4,IVF16_HNSW8,PQ4", "IDMap,PQ4"):
        assert _polysemous(faiss.index_factory(16, string)) is True, string
        assert _polysemous(faiss_index.make(string, 16)) is False, string
    assert _polysemous(faiss_index.make("IVF16,Flat", 16)) is None
    faiss.omp_set_num_threads(1)
    x = np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32)
    got = []
    for index in (faiss.index_factory(16, "IVF16,PQ4x6"), faiss_index.make("IVF16,PQ4x6", 16)):
        index.train(x)
        index.add(x[:2000])
        faiss_index.set_nprobe(index, 16)
        got.append((index.search(x[2000:2200], 10), index.sa_encode(x[:2000])))
    ((d_poly, i_poly), c_poly), ((d, i), c) = got
    assert np.array_equal(i, i_poly) and np.array_equal(d, d_poly)
    assert not np.array_equal(c, c_poly)  # the factory's index really was reordered


@pytest.mark.parametrize("string", ["Flat", "IVF16,Flat", "IVF16,PQ8x4", "OPQ8,IVF16_HNSW8,PQ8x4"])
def test_adding_parallel_encoded_codes_equals_adding_vectors(string):
    """What each rank encodes with sa_encode, appended by rank 0, is the index add() builds."""
    import faiss

    faiss.omp_set_num_threads(1)  # OpenMP spin-waits badly when the cores are busy with other tests
    x = np.random.default_rng(0).random((1200, 32)).astype(np.float32)
    a = faiss_index.make(string, 32)
    a.train(x)
    b = faiss_index.make(string, 32)
    b.train(x)  # same data and seed: the same trained state
    a.add(x)
    for start in range(0, 1200, 400):  # three "ranks", appended in order
        faiss_index.add_codes(b, faiss_index.encode(b, x[start:start + 400]), np.arange(start, start + 400))
    assert b.ntotal == 1200
    faiss_index.set_nprobe(a, 4)
    faiss_index.set_nprobe(b, 4)
    assert np.array_equal(a.search(x[:100], 5)[1], b.search(x[:100], 5)[1])


def test_block_keys_hash_whole_arrays():
    from retro_toolkit.collections.retrieval.keys import sha as _sha

    a = np.arange(5000)
    b = a.copy()
    b[2500] = -1  # a change numpy's repr would hide behind "..."
    assert _sha([a]) != _sha([b]) and _sha([a]) == _sha([a.copy()])
    assert _sha([a[:10], a[10:20]]) != _sha([a[:20]])


def test_the_chunk_db_is_built_a_block_of_documents_at_a_time_and_read_through_memory_maps(tmp_path, monkeypatch):
    """Built in steps of BUILD_DOCS documents, the database equals chunking every document at once;
    load() maps its per-chunk columns instead of reading them into memory."""
    rng = np.random.default_rng(0)

    def offsets(n):
        return np.concatenate([[0], np.cumsum(rng.integers(1, 300, n))]).astype(np.int64)

    parts = [chunk_db.Part("train", offsets(1000)), chunk_db.Part("extra", offsets(333)),
             chunk_db.Part("empty", np.zeros(1, np.int64))]
    monkeypatch.setattr(chunk_db, "BUILD_DOCS", 97)
    db = chunk_db.build(parts, 64, tmp_path / "chunks.h5")
    whole = np.concatenate([[0], parts[0].doc_offsets[1:], parts[1].doc_offsets[1:] + parts[0].doc_offsets[-1]])
    doc, start, end = chunk_db.cut_chunks(whole, 64)
    assert np.array_equal(db.chunk_doc, doc) and np.array_equal(db.chunk_start, start)
    assert np.array_equal(db.chunk_end, end) and np.array_equal(db.doc_offsets, whole)
    assert db.part_chunks.tolist() == np.searchsorted(start, [0, parts[0].doc_offsets[-1], whole[-1], whole[-1]]).tolist()
    assert all(isinstance(c, np.memmap) for c in (db.chunk_doc, db.chunk_start, db.chunk_end, db.doc_offsets))


def test_neighbour_blocks_read_as_one_array_with_few_open_maps(tmp_path):
    n, spans = 1000, blocks.ranges(1000, 128)
    want = np.arange(n * 3).reshape(n, 3)
    for s, e in spans:
        blocks.write(blocks.path(tmp_path, s, e, n), want[s:e], key=str(s))
    rows = blocks.map_rows(tmp_path, n, spans, lambda s, e: str(s), 3)
    rows.open_blocks = 2
    rng = np.random.default_rng(0)
    for lo, hi in (sorted(rng.integers(0, n + 1, 2)) for _ in range(200)):
        assert np.array_equal(rows[lo:hi], want[lo:hi])
    assert len(rows._open) == 2 and np.array_equal(np.asarray(rows), want)
    damaged = blocks.path(tmp_path, *spans[3], n)
    damaged.write_bytes(b"not hdf5")
    with pytest.raises(RuntimeError, match=f"block {damaged} is missing or damaged"):
        blocks.map_rows(tmp_path, n, spans, lambda s, e: str(s), 3)  # found when mapped, not when read


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_block_keys_fed_a_run_at_a_time_equal_the_per_chunk_digest(dtype):
    """The embedding block key existing work directories hold: sha(embedder id, [each chunk's
    tokens]); chunk_block_key feeds runs of chunks and must give the same digest."""
    from retro_toolkit.collections.retrieval.keys import chunk_block_key, sha

    rng = np.random.default_rng(0)
    lengths = rng.geometric(1 / 300, 400) + 1
    offsets = np.concatenate([[0], np.cumsum(lengths + 1)])  # an EOD after each document
    doc, start, end = chunk_db.cut_chunks(offsets, 64)
    stream = rng.integers(0, 60000, int(offsets[-1])).astype(dtype)
    eid = ("builtin:all-minilm-l6-v2", 256, 384)
    for lo, hi in ((0, len(start)), (3, 17), (5, 5), (len(start) - 1, len(start))):
        want = sha(eid, [stream[s:e] for s, e in zip(start[lo:hi], end[lo:hi])])
        assert chunk_block_key(eid, stream, start[lo:hi], end[lo:hi]) == want
