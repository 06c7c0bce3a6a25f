"""An IVF index filled from code blocks on disk (collections/retrieval/ivf_fill.py) is the file
faiss writes after adding the same codes in memory, byte for byte, whatever the window."""

from __future__ import annotations

import numpy as np
import pytest

from retro_toolkit.collections.retrieval import index as faiss_index
from retro_toolkit.collections.retrieval import ivf_fill

D = 16


def _trained(string: str, n_train: int = 6000):
    import faiss

    x = np.random.default_rng(0).standard_normal((n_train, D)).astype(np.float32)
    index = faiss_index.make(string, D)
    index.train(x)
    return faiss.serialize_index(index)


# (factory string, vectors added): IVF1000 needs 2-byte list numbers and is "full" on disk;
# IVF256 with 60 vectors leaves most lists empty, so faiss writes its sparse form.
CASES = [("IVF64,Flat", 5000), ("IVF32,PQ4", 5000), ("OPQ4,IVF100_HNSW16,PQ4", 5000), ("IVF64,SQ8", 5000),
         ("IVF1000,Flat", 5000), ("IVF256,Flat", 60)]


@pytest.mark.parametrize("string,n", CASES)
def test_the_filled_file_is_faiss_own_byte_for_byte_and_searches_the_same(tmp_path, string, n):
    import faiss

    blob = _trained(string)
    x = np.random.default_rng(1).standard_normal((n, D)).astype(np.float32)
    reference = faiss.deserialize_index(blob)
    blocks = [(np.arange(s, min(n, s + 1200)), faiss_index.encode(reference, x[s:s + 1200])) for s in range(0, n, 1200)]
    for ids, codes in blocks:
        faiss_index.add_codes(reference, codes, ids)
    faiss.write_index(reference, str(tmp_path / "reference"))
    want = (tmp_path / "reference").read_bytes()
    for window in (1 << 30, 5000, 1):  # one window; several; one list at a time
        index = faiss.deserialize_index(blob)
        assert ivf_fill.supported(index)
        assert ivf_fill.write_filled(index, lambda: iter(blocks), tmp_path / "filled", window) == n
        assert (tmp_path / "filled").read_bytes() == want, window
    mapped = faiss_index.load(tmp_path / "filled", mmap=True)
    faiss_index.set_nprobe(mapped, 8)
    faiss_index.set_nprobe(reference, 8)
    assert np.array_equal(mapped.search(x[:50], 5)[1], reference.search(x[:50], 5)[1])


@pytest.mark.parametrize("string", ["Flat", "HNSW16", "PQ4", "IVF32,PQ4x4fs", "IVF32,Flat,Refine(Flat)"])
def test_indexes_it_cannot_fill_are_left_to_faiss(string):
    import faiss

    assert not ivf_fill.supported(faiss.deserialize_index(_trained(string)))


def test_list_numbers_read_little_endian_coarse_bytes():
    codes = np.array([[0x34, 0x12, 9], [0xFF, 0x00, 9], [0x00, 0x01, 9]], dtype=np.uint8)
    assert ivf_fill.list_numbers(codes, 2).tolist() == [0x1234, 0xFF, 0x100]
    assert ivf_fill.list_numbers(codes, 1).tolist() == [0x34, 0xFF, 0x00]


def test_encoding_needs_no_search_table(tmp_path):
    """The trained index is read without IVF-PQ's precomputed search table (nlist x M x 256
    floats) where it is only encoded with; the codes are the same, and searching still builds it."""
    import faiss

    (tmp_path / "trained").write_bytes(_trained("OPQ4,IVF100_HNSW16,PQ4").tobytes())
    x = np.random.default_rng(1).standard_normal((3000, D)).astype(np.float32)

    def table(index):
        return faiss.downcast_index(faiss.extract_index_ivf(index)).precomputed_table.size()

    bare = faiss_index.load(tmp_path / "trained", search_tables=False)
    searching = faiss_index.load(tmp_path / "trained")
    assert table(bare) == 0 and table(searching) == 100 * 4 * 256
    assert np.array_equal(faiss_index.encode(bare, x), faiss_index.encode(searching, x))

    fresh = faiss_index.make("IVF100,PQ4", D)
    faiss_index.skip_search_tables(fresh)
    fresh.train(np.random.default_rng(0).standard_normal((6000, D)).astype(np.float32))
    assert table(fresh) == 0


@pytest.mark.parametrize("string", ["IVF64,PQ4", "Flat", "PQ4"])
def test_chunks_taken_out_are_not_in_the_filled_index_and_the_rest_keep_their_ids(tmp_path, string):
    """Blocks with gaps in their ids (documents taken out of the database): an IVF file is still
    faiss's own; a Flat or PQ index is wrapped in an IDMap; no search returns a missing id."""
    import faiss

    n = 5000
    x = np.random.default_rng(2).standard_normal((n, D)).astype(np.float32)
    keep = np.random.default_rng(3).random(n) > 0.2
    blob = _trained(string) if string != "Flat" else faiss.serialize_index(faiss.index_factory(D, "Flat"))
    reference = faiss.deserialize_index(blob)
    blocks = []
    for s in range(0, n, 1200):
        ids, codes = np.arange(s, min(n, s + 1200)), faiss_index.encode(reference, x[s:s + 1200])
        blocks.append((ids[keep[s:s + 1200]], codes[keep[s:s + 1200]]))
    index = faiss_index.filled(faiss.deserialize_index(blob), blocks)
    faiss_index.save(index, tmp_path / "filled")
    if string.startswith("IVF"):
        for ids, codes in blocks:
            faiss_index.add_codes(reference, codes, ids)
        faiss.write_index(reference, str(tmp_path / "reference"))
        assert ivf_fill.write_filled(faiss.deserialize_index(blob), lambda: iter(blocks), tmp_path / "windowed", 5000) \
            == keep.sum()
        assert (tmp_path / "windowed").read_bytes() == (tmp_path / "reference").read_bytes()
    loaded = faiss_index.load(tmp_path / "filled", mmap=True)
    faiss_index.set_nprobe(loaded, 64)
    assert loaded.ntotal == keep.sum()
    _, found = loaded.search(x, 3)
    assert np.isin(found[found >= 0], np.flatnonzero(keep)).all()
    if string == "Flat":  # exact: every kept vector finds itself under its own id
        assert np.array_equal(found[keep, 0], np.flatnonzero(keep))
