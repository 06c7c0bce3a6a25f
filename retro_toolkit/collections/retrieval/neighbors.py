"""Neighbour candidates of every query chunk: the aligned m-token windows of a split's stream.

Retro excludes neighbours from every document of the training sequence, but a neighbour
build must serve any sequence length, so the exclusion happens in two steps. Here, at
build time, a query chunk's candidates lose every database chunk from a document that
overlaps the query chunk or the chunk after it (the tokens those neighbours help
predict), and the first `retrieval.num_candidates` survivors are stored in rank order,
-1 padding. The dataset then drops the candidates from any document its sample's token
window touches and keeps the first k (`sample_doc_range`, `filter_candidates`).

    neighbors/<split>/NNNNNN-NNNNNN.h5   dataset `data` int64 [query chunks, num_candidates]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

NEIGHBORS_DIR = "neighbors"
NEIGHBORS_META = "neighbors/meta.json"
# Candidates stored per query chunk when retrieval.num_candidates is null, as a multiple of k.
CANDIDATES_PER_NEIGHBOUR = 4


def num_query_chunks(num_tokens: int, m: int) -> int:
    return -(-num_tokens // m)


def num_candidates(setting: int | None, k: int, k_query: int) -> int:
    """Candidates stored per query chunk: the recipe's setting, else a few times k (at most k_query)."""
    return setting if setting is not None else min(CANDIDATES_PER_NEIGHBOUR * k, k_query)


def query_windows(tokens: np.ndarray, start: int, end: int, m: int) -> list[np.ndarray]:
    """Token windows of query chunks [start, end) (the last one may be short)."""
    return [np.asarray(tokens[i * m : (i + 1) * m]) for i in range(start, end)]


def doc_range(
    doc_offsets: np.ndarray, first_tok: np.ndarray | int, last_tok: np.ndarray | int
) -> tuple[np.ndarray, np.ndarray]:
    """The first and last document holding tokens first_tok..last_tok (inclusive)."""
    lo = np.searchsorted(doc_offsets, first_tok, side="right") - 1
    hi = np.searchsorted(doc_offsets, last_tok, side="right") - 1
    return lo, hi


def banned_doc_range(doc_offsets: np.ndarray, num_tokens: int, start: int, end: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query chunk i in [start, end): the first and last document touching tokens [i*m, (i+2)*m)."""
    i = np.arange(start, end, dtype=np.int64)
    return doc_range(doc_offsets, i * m, np.minimum((i + 2) * m, num_tokens) - 1)


def sample_doc_range(doc_offsets: np.ndarray, start: int, length: int) -> tuple[int, int]:
    """The first and last document touching a sample's tokens [start, start + length)."""
    lo, hi = doc_range(doc_offsets, start, start + length - 1)
    return int(lo), int(hi)


def filter_candidates(
    candidates: np.ndarray, candidate_doc: np.ndarray, lo: np.ndarray | int | None, hi: np.ndarray | int | None, k: int
) -> np.ndarray:
    """Keep the first k candidates (in rank order) whose document is outside [lo, hi]; pad with -1.
    A candidate whose document is -1 (taken out of the database since it was found) is dropped.

    lo and hi are per row ([rows] arrays), one range for all rows (ints), or None (no ban).
    """
    valid = (candidates >= 0) & (candidate_doc >= 0)
    if lo is not None:
        lo, hi = np.reshape(lo, (-1, 1)), np.reshape(hi, (-1, 1))
        valid &= ~((candidate_doc >= lo) & (candidate_doc <= hi))
    # stable sort puts valid candidates first while keeping their rank order
    order = np.argsort(~valid, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(np.where(valid, candidates, -1), order, axis=1)
    if kept.shape[1] < k:
        kept = np.pad(kept, ((0, 0), (0, k - kept.shape[1])), constant_values=-1)
    return kept.astype(np.int64)


def map_neighbors(workdir: Path, split: str):
    """A split's neighbour candidates, [query chunks, num_candidates], as memory-mapped row blocks
    (slice rows out of it); every block's key and size are checked."""
    from retro_toolkit.collections.retrieval import blocks
    from retro_toolkit.core import files

    meta = files.read_json(workdir / NEIGHBORS_META)
    s = meta["splits"][split]
    spans = blocks.ranges(s["query_chunks"], meta["block_size"])
    keys = dict(zip(spans, s["keys"]))
    try:
        return blocks.map_rows(workdir / NEIGHBORS_DIR / split, s["query_chunks"], spans, lambda a, b: keys[(a, b)],
                               meta["num_candidates"])
    except RuntimeError as e:
        from retro_toolkit.errors import UserError

        raise UserError(f"{e}: rerun the build_db stage (--force build_db), which recomputes only the blocks "
                        "that are missing or damaged.") from None


def load_neighbors(workdir: Path, split: str) -> np.ndarray:
    """All neighbour candidates of a split in memory (inspection and tests; training maps them)."""
    return map_neighbors(workdir, split)[:]
