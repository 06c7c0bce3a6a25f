"""Content keys of build_db's blocks: a block is reused only while its key is unchanged.

`sha` hashes any mix of values, lists and arrays. `chunk_block_key` is the key of an
embedding block: sha(embedder id, [the token array of each chunk]), the same digest as
hashing each chunk in a loop, fed a run of chunks at a time; build_db has each rank compute
the keys of its own blocks and gathers them (a per-chunk loop over 19 billion chunks on
every rank at every run would take hours).
"""

from __future__ import annotations

import hashlib

import numpy as np


def _feed(h, p: object) -> None:
    if isinstance(p, np.ndarray):
        h.update(f"{p.dtype}{p.shape}".encode())
        h.update(np.ascontiguousarray(p).tobytes())
    elif isinstance(p, (list, tuple)):
        h.update(b"[")
        for q in p:
            _feed(h, q)
        h.update(b"]")
    else:
        h.update(repr(p).encode())


def sha(*parts: object) -> str:
    """Content hash; arrays (also inside lists) hash by their bytes, never by repr (which elides)."""
    h = hashlib.sha256()
    for p in parts:
        _feed(h, p)
    return h.hexdigest()


def chunk_block_key(embedder_id: tuple, stream: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> str:
    """sha(embedder_id, [stream[s:e] for s, e in zip(starts, ends)]), fed a run at a time: chunks of
    one length that follow each other in the stream (a document's full chunks) are one 2-D array
    whose rows are header + token bytes, so Python steps once per run, not once per chunk."""
    starts, ends = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
    lengths = ends - starts
    item = stream.dtype.itemsize
    h = hashlib.sha256()
    _feed(h, embedder_id)
    h.update(b"[")
    if len(starts):
        breaks = np.flatnonzero((lengths[1:] != lengths[:-1]) | (starts[1:] != ends[:-1])) + 1
        firsts = np.concatenate([[0], breaks])
        lasts = np.concatenate([breaks, [len(starts)]])
        for a, b in zip(firsts.tolist(), lasts.tolist()):
            n, s = int(lengths[a]), int(starts[a])
            head = np.frombuffer(f"{stream.dtype}({n},)".encode(), np.uint8)
            rows = np.empty((b - a, len(head) + n * item), dtype=np.uint8)
            rows[:, :len(head)] = head
            rows[:, len(head):] = np.ascontiguousarray(stream[s:s + (b - a) * n]).view(np.uint8).reshape(b - a, n * item)
            h.update(rows.tobytes())
    h.update(b"]")
    return h.hexdigest()
