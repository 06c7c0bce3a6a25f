"""Fill an IVF index from code blocks on disk, without holding the codes in memory.

faiss's own path (add the codes to the index's in-memory lists, then write_index) needs
every chunk's code in one process: at InstructRetro's 19 billion chunks that is over a
terabyte on rank 0. This module writes the same file straight to disk instead:

  1. count, over every code block, how many chunks each list gets (a list number is the
     first bytes of a chunk's sa_encode code);
  2. serialize the trained index with empty lists and ntotal set, and cut it where its
     empty inverted lists are;
  3. write the lists' header as faiss would for the filled index, then scatter each
     block's codes and ids to their place in their list, through a memory-mapped window
     of at most `window_bytes` of the file (the codes are read once per window).

Entries keep chunk order inside each list, as sequential add_sa_codes would leave them, so
the file is byte-identical to faiss's (tests/test_ivf_fill.py checks it for several index
types). Searching maps it (index.load(mmap=True)): the lists stay in the page cache.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from retro_toolkit.core import files

CodeBlocks = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]  # (chunk ids, codes) per block, ids ascending
SCATTER_ROWS = 1 << 14  # entries scattered at a time: bounds the index arrays numpy builds


def _ivf(index):
    """The IVF part of `index` when this module can fill it, else None."""
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return None
    top = faiss.downcast_index(index)
    if isinstance(top, faiss.IndexPreTransform):
        top = faiss.downcast_index(top.index)
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    if (not isinstance(top, (faiss.IndexIVFFlat, faiss.IndexIVFPQ, faiss.IndexIVFScalarQuantizer))
            or isinstance(top, (faiss.IndexIVFPQR, faiss.IndexIVFFlatDedup))
            or type(lists) is not faiss.ArrayInvertedLists or ivf.ntotal != 0):
        return None
    return ivf


def supported(index) -> bool:
    """Whether `index` (trained, empty) is an IVF whose lists this module can write."""
    return _ivf(index) is not None


def list_numbers(codes: np.ndarray, coarse_bytes: int) -> np.ndarray:
    """The list of each sa_encode code: its first coarse_bytes bytes, little-endian."""
    out = np.zeros(len(codes), dtype=np.int64)
    for i in range(coarse_bytes):
        out |= codes[:, i].astype(np.int64) << (8 * i)
    return out


def _split(blob: bytes, nlist: int, code_size: int) -> tuple[bytes, bytes]:
    """(bytes before, bytes after) the empty inverted lists of a serialized trained index."""
    empty = b"ilar" + struct.pack("<QQ", nlist, code_size) + b"sprs" + struct.pack("<Q", 0)
    at = blob.find(empty)
    if at < 0 or blob.find(empty, at + 1) >= 0:
        raise RuntimeError("cannot locate the empty inverted lists in the serialized index")
    return blob[:at], blob[at + len(empty):]


def _lists_header(sizes: np.ndarray, code_size: int) -> bytes:
    """What faiss's write_InvertedLists writes before the list data (sparse when at most half
    the lists hold entries)."""
    nlist = len(sizes)
    head = b"ilar" + struct.pack("<QQ", nlist, code_size)
    nonzero = np.flatnonzero(sizes)
    if len(nonzero) > nlist // 2:
        return head + b"full" + struct.pack("<Q", nlist) + sizes.astype("<u8").tobytes()
    pairs = np.stack([nonzero, sizes[nonzero]], axis=1).astype("<u8")
    return head + b"sprs" + struct.pack("<Q", pairs.size) + pairs.tobytes()


def write_filled(index, code_blocks: CodeBlocks, path: Path, window_bytes: int = 8 << 30) -> int:
    """Write `index` (trained, empty, supported) with every block's codes added under their
    chunk ids, to `path`. Returns the number of entries. `index` itself is left with ntotal set."""
    import faiss

    ivf = _ivf(index)
    nlist, code_size, coarse = ivf.nlist, ivf.code_size, ivf.coarse_code_size()
    sizes = np.zeros(nlist, dtype=np.int64)
    for _, codes in code_blocks():
        if codes.shape[1] != coarse + code_size:
            raise ValueError(f"codes of {codes.shape[1]} bytes; this index's are {coarse + code_size}")
        sizes += np.bincount(list_numbers(codes, coarse), minlength=nlist)
    n = int(sizes.sum())
    ivf.ntotal = n
    index.ntotal = n
    before, after = _split(faiss.serialize_index(index).tobytes(), nlist, code_size)
    head = _lists_header(sizes, code_size)
    entry = code_size + 8
    start = np.zeros(nlist + 1, dtype=np.int64)  # each list's first byte in the file
    start[0] = len(before) + len(head)
    np.cumsum(sizes * entry, out=start[1:])
    start[1:] += start[0]
    with files.atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(before + head)
            f.truncate(int(start[-1]))
            f.seek(int(start[-1]))
            f.write(after)
        written = np.zeros(nlist, dtype=np.int64)
        for lo, hi in _windows(start, window_bytes):
            base = int(start[lo])
            window = np.memmap(tmp, dtype=np.uint8, mode="r+", offset=base, shape=(int(start[hi]) - base,))
            for ids, codes in code_blocks():
                _scatter(window, base, codes, ids, coarse, code_size, lo, hi, start, sizes, written)
            window.flush()
            del window
    return n


def _windows(start: np.ndarray, window_bytes: int) -> list[tuple[int, int]]:
    """Runs of whole lists [lo, hi) of at most window_bytes each (a longer list alone)."""
    out, lo, nlist = [], 0, len(start) - 1
    while lo < nlist:
        hi = int(np.searchsorted(start, start[lo] + window_bytes, side="right")) - 1
        hi = min(max(hi, lo + 1), nlist)
        out.append((lo, hi))
        lo = hi
    return out


def _scatter(window, base, codes, chunk_ids, coarse, code_size, lo, hi, start, sizes, written) -> None:
    """Copy the entries of lists [lo, hi) from one block to their places; `written` counts each
    list's entries so far."""
    lists = list_numbers(codes, coarse)
    rows = np.flatnonzero((lists >= lo) & (lists < hi))
    rows = rows[np.argsort(lists[rows], kind="stable")]  # by list, chunk order inside a list
    lists = lists[rows]
    rank = np.arange(len(rows)) - np.searchsorted(lists, lists, side="left")  # place among this block's
    pos = written[lists] + rank
    if len(lists):
        change = np.flatnonzero(np.diff(lists)) + 1  # lists is sorted: count each run
        runs = np.diff(np.concatenate([[0], change, [len(lists)]]))
        written[lists[np.concatenate([[0], change])]] += runs
    code_at = start[lists] - base + pos * code_size
    id_at = start[lists] - base + sizes[lists] * code_size + pos * 8
    ids = np.ascontiguousarray(chunk_ids[rows], dtype="<i8").view(np.uint8).reshape(-1, 8)
    body = codes[rows, coarse:]
    for a in range(0, len(rows), SCATTER_ROWS):
        b = a + SCATTER_ROWS
        window[code_at[a:b, None] + np.arange(code_size)] = body[a:b]
        window[id_at[a:b, None] + np.arange(8)] = ids[a:b]
