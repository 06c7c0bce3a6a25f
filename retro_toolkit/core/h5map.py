"""HDF5 datasets as read-only memory maps: a per-chunk or per-token table is paged in as it is
read, never held whole by every rank (at InstructRetro's 19 billion chunks, three int64
columns are 456 GB).

h5py stores a dataset written whole (f["x"] = array) contiguously, uncompressed, at a byte
offset the file reports; numpy maps exactly those bytes. Chunked or compressed datasets
(none written here) are read into memory instead.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Callable, Sequence

import numpy as np


def mapped(path: str | os.PathLike, name: str) -> np.ndarray:
    """Dataset `name` of `path`: a memory map where the layout allows, else an in-memory copy."""
    import h5py

    with h5py.File(path, "r") as f:
        d = f[name]
        offset = d.id.get_offset() if d.chunks is None and d.compression is None else None
        if offset is None or d.size == 0:
            return d[()]
        shape, dtype = d.shape, d.dtype
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


class Rows:
    """Row blocks read as one array along axis 0. Each block is opened (e.g. memory-mapped) when a
    row of it is first read, and at most `open_blocks` stay open: a split of 10^5 blocks must not
    hold 10^5 maps (Linux allows 65,530 per process by default)."""

    def __init__(self, lengths: Sequence[int], open_block: Callable[[int], np.ndarray], shape_tail: tuple = (),
                 dtype=np.int64, open_blocks: int = 64) -> None:
        self.open_block, self.open_blocks = open_block, open_blocks
        self.starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.shape = (int(self.starts[-1]), *shape_tail)
        self.dtype = np.dtype(dtype)
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return self.shape[0]

    def _block(self, b: int) -> np.ndarray:
        if b in self._open:
            self._open.move_to_end(b)
        else:
            self._open[b] = self.open_block(b)
            if len(self._open) > self.open_blocks:
                self._open.popitem(last=False)
        return self._open[b]

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("Rows takes a contiguous slice of rows")
        start, stop, _ = rows.indices(len(self))
        if stop <= start:
            return np.zeros((0, *self.shape[1:]), self.dtype)
        first = int(np.searchsorted(self.starts, start, side="right") - 1)
        last = int(np.searchsorted(self.starts, stop - 1, side="right") - 1)
        pieces = [np.asarray(self._block(b)[max(start - self.starts[b], 0):min(stop, self.starts[b + 1]) - self.starts[b]])
                  for b in range(first, last + 1)]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out.astype(dtype) if dtype is not None else out
