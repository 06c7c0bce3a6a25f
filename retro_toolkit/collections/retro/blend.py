"""Weighted blends of corpora: which window of which source each training sample reads.

Sample i goes to the source furthest behind its share (the j-th sample of source s is
due at time (j + 1/2) / p_s; samples take sources in order of due time), so any prefix
of the schedule matches the weights to within one sample per source. Within a source,
windows are drawn from a fresh seeded permutation every time the source runs out.
"""

from __future__ import annotations

import math

import numpy as np

from retro_toolkit.errors import UserError


def source_windows(doc_offsets: np.ndarray, docs_per_source: list[int], seq_length: int,
                   windows: int) -> list[np.ndarray]:
    """Stream windows (start = index * seq_length) that start inside each source's documents."""
    bounds = np.concatenate([[0], np.cumsum(docs_per_source)]).astype(np.int64)
    out = []
    for s in range(len(docs_per_source)):
        lo, hi = int(doc_offsets[bounds[s]]), int(doc_offsets[bounds[s + 1]])
        out.append(np.arange(-(-lo // seq_length), min(-(-hi // seq_length), windows), dtype=np.int64))
    return out


def schedule(weights: list[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(source of each sample, its index among that source's samples), int16 / int64 arrays."""
    total = float(sum(weights))
    ids, pos, due = [], [], []
    for s, w in enumerate(weights):
        if w <= 0:
            continue
        n = math.ceil(num_samples * w / total) + 1
        j = np.arange(n, dtype=np.int64)
        ids.append(np.full(n, s, dtype=np.int16))
        pos.append(j)
        due.append((j + 0.5) / (w / total))
    order = np.argsort(np.concatenate(due), kind="stable")[:num_samples]
    return np.concatenate(ids)[order], np.concatenate(pos)[order]


class Blend:
    def __init__(self, windows_per_source: list[np.ndarray], weights: list[float], num_samples: int, seed: int):
        for s, (w, win) in enumerate(zip(weights, windows_per_source)):
            if w > 0 and len(win) == 0:
                raise UserError(
                    f"data.sources[{s}] has weight {w} in pretrain.source_weights but no training window "
                    "(fewer train tokens than model.seq_length + 1): give it weight 0 or add documents."
                )
        self.windows_per_source, self.seed = windows_per_source, seed
        self.source, self.position = schedule(weights, num_samples)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def window(self, i: int) -> int:
        s = int(self.source[i])
        windows = self.windows_per_source[s]
        epoch, j = divmod(int(self.position[i]), len(windows))
        key = (s, epoch)
        if key not in self._perms:
            if len(self._perms) > 64:
                self._perms.clear()
            self._perms[key] = np.random.default_rng([self.seed, s, epoch]).permutation(len(windows))
        return int(windows[self._perms[key][j]])
