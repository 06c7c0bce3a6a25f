"""Which split (train / valid / test) each unit of the corpus goes to.

`data.split_by: document` (default): each source's documents are cut into three
contiguous ranges by `data.split`, so valid and test are whole documents nobody trained
on (and the database never holds).

`data.split_by: passage`: each document is cut at blank lines into passages of about
`data.passage_chars` characters, and each source's passages are dealt to the splits in
an interleaved, deterministic pattern with the `data.split` fractions. Valid and test
are then unseen passages of documents whose other passages are in train and in the
database: retrieval can bring back the rest of the document, as in RETRO's Wikipedia
evaluations, but never the evaluated text itself.
"""

from __future__ import annotations

import bisect
import itertools
import math
import re

import numpy as np

SPLIT_BY = ("document", "passage")
_GOLDEN = (5**0.5 - 1) / 2
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


def split_bounds(num_docs: int, fractions: list[float]) -> list[int]:
    """Document index where each split starts, plus num_docs: [0, train_end, valid_end, num_docs]."""
    bounds = [0]
    acc = 0.0
    for f in fractions[:-1]:
        acc += f
        bounds.append(int(round(acc * num_docs)))
    bounds.append(num_docs)
    return bounds


def cut_passages(text: str, target_chars: int) -> list[str]:
    """Cut at blank lines into passages of at least target_chars (the tail joins the last one
    when shorter than half of that); one paragraph longer than the target stays whole."""
    cuts = [m.end() for m in _BLANK_LINE.finditer(text)]
    pieces, start = [], 0
    for c in cuts:
        if c - start >= target_chars:
            pieces.append((start, c))
            start = c
    if start < len(text):
        if pieces and len(text) - start < target_chars // 2:
            pieces[-1] = (pieces[-1][0], len(text))
        else:
            pieces.append((start, len(text)))
    return [p for p in (text[a:b].strip() for a, b in pieces) if p]


def interleaved_labels(n: int, fractions: list[float], start: int = 0) -> np.ndarray:
    """Split number of units start..start+n-1: the golden-ratio sequence frac((j + 1/2) * phi)
    falls in [0, f0), [f0, f0 + f1) or beyond, so every stretch of units is split close to
    the fractions and held-out units are spread through the source."""
    u = np.modf((np.arange(start, start + n, dtype=np.float64) + 0.5) * _GOLDEN)[0]
    edges = np.cumsum(fractions[:-1])
    return np.searchsorted(edges, u, side="right").astype(np.int64)


class Splitter:
    """Split number of the corpus's units (documents or passages) numbered across sources.

    Memory is per source, not per unit: a corpus of hundreds of millions of documents
    holds no label array."""

    _COUNT_BLOCK = 1 << 22

    def __init__(self, per_source: list[int], fractions: list[float], split_by: str = "document"):
        self.fractions = list(fractions)
        self.passages = split_by == "passage"
        self._starts = [0, *itertools.accumulate(per_source)]
        self._edges = np.cumsum(self.fractions[:-1]).tolist()
        self.bounds = [split_bounds(n, self.fractions) for n in per_source]
        self.counts = [self._count(n, b) for n, b in zip(per_source, self.bounds)]

    def _count(self, n: int, bounds: list[int]) -> list[int]:
        if not self.passages:
            return [bounds[s + 1] - bounds[s] for s in range(3)]
        counts = np.zeros(3, dtype=np.int64)
        for a in range(0, n, self._COUNT_BLOCK):
            counts += np.bincount(interleaved_labels(min(self._COUNT_BLOCK, n - a), self.fractions, a), minlength=3)
        return counts.tolist()

    def __call__(self, i: int) -> int:
        # Called once per unit while tokenizing: plain Python, the same float64 arithmetic
        # as interleaved_labels.
        src = bisect.bisect_right(self._starts, i) - 1
        j = i - self._starts[src]
        if self.passages:
            return bisect.bisect_right(self._edges, math.modf((j + 0.5) * _GOLDEN)[0])
        return bisect.bisect_right(self.bounds[src][1:3], j)

    def source_counts(self, split: int) -> list[int]:
        """Units of each source in one split."""
        return [c[split] for c in self.counts]
