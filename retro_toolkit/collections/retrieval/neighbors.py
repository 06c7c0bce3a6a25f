"""Neighbours of every query chunk: the aligned m-token windows of a split's stream.

A query chunk's candidates exclude every database chunk from a document that overlaps
the query chunk or the chunk after it (the tokens those neighbours help predict), so
nothing leaks the text being predicted. The first k survivors are kept; -1 pads.

    neighbors/<split>/NNNNNN-NNNNNN.h5   dataset `data` int64 [query chunks, k]
"""

from __future__ import annotations

import numpy as np


def num_query_chunks(num_tokens: int, m: int) -> int:
    return -(-num_tokens // m)


def query_windows(tokens: np.ndarray, start: int, end: int, m: int) -> list[np.ndarray]:
    """Token windows of query chunks [start, end) (the last one may be short)."""
    return [np.asarray(tokens[i * m : (i + 1) * m]) for i in range(start, end)]


def banned_doc_range(doc_offsets: np.ndarray, num_tokens: int, start: int, end: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query chunk i in [start, end): the first and last document touching tokens [i*m, (i+2)*m)."""
    i = np.arange(start, end, dtype=np.int64)
    first_tok = i * m
    last_tok = np.minimum((i + 2) * m, num_tokens) - 1
    lo = np.searchsorted(doc_offsets, first_tok, side="right") - 1
    hi = np.searchsorted(doc_offsets, last_tok, side="right") - 1
    return lo, hi


def filter_candidates(
    candidates: np.ndarray, candidate_doc: np.ndarray, lo: np.ndarray | None, hi: np.ndarray | None, k: int
) -> np.ndarray:
    """Keep the first k candidates (in rank order) outside [lo, hi]; pad with -1."""
    valid = candidates >= 0
    if lo is not None:
        valid &= ~((candidate_doc >= lo[:, None]) & (candidate_doc <= hi[:, None]))
    # stable sort puts valid candidates first while keeping their rank order
    order = np.argsort(~valid, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(np.where(valid, candidates, -1), order, axis=1)
    if kept.shape[1] < k:
        kept = np.pad(kept, ((0, 0), (0, k - kept.shape[1])), constant_values=-1)
    return kept.astype(np.int64)
