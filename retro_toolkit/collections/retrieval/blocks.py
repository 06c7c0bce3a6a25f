"""Block files: a long array computed in fixed ranges, one HDF5 file per range.

    <dir>/NNNNNN-NNNNNN.h5   dataset `data` for rows [start, end), attrs rows/complete

A block is written to a temporary name and renamed, so a killed run leaves whole
blocks or none; a rerun computes only the missing ones. Each block records the `key`
(a hash of everything that determines its content); a block with another key is
recomputed, so a changed setting never reuses old blocks. A block that does not open or
has the wrong shape (a truncated copy, a bad disk) is reported and rebuilt.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from retro_toolkit.core import files


Span = tuple[int, int]
Key = str | Callable[[int, int], str]


def ranges(n: int, block_size: int, boundaries: tuple[int, ...] | list[int] = ()) -> list[Span]:
    """Blocks of at most block_size rows; a block never straddles a boundary (e.g. where
    an extra corpus starts), so adding rows after a boundary leaves earlier blocks as they are."""
    cuts = sorted({0, n, *(int(b) for b in boundaries if 0 < b < n)})
    return [(s, min(s + block_size, hi)) for lo, hi in zip(cuts, cuts[1:]) for s in range(lo, hi, block_size)]


def _key(key: Key, start: int, end: int) -> str:
    return key if isinstance(key, str) else key(start, end)


def path(folder: Path, start: int, end: int, n: int) -> Path:
    width = max(6, len(str(n)))
    return folder / f"{start:0{width}d}-{end:0{width}d}.h5"


def read(p: Path, rows: int | None = None, key: str | None = None) -> np.ndarray | None:
    """The block's array, or None when it is missing, unreadable, the wrong size or stale."""
    import h5py

    if not p.exists():
        return None
    try:
        with h5py.File(p, "r") as f:
            if not f.attrs.get("complete", False):
                return None
            if key is not None and f.attrs.get("key") != key:
                return None
            data = f["data"][:]
    except (OSError, KeyError, ValueError):
        return None
    if rows is not None and len(data) != rows:
        return None
    return data


def valid(p: Path, rows: int, key: str) -> bool:
    """Whether the block is complete, current and of the right size, from its attributes and
    shape alone (its data is not read)."""
    import h5py

    if not p.exists():
        return False
    try:
        with h5py.File(p, "r") as f:
            return bool(f.attrs.get("complete", False)) and f.attrs.get("key") == key and len(f["data"]) == rows
    except (OSError, KeyError, ValueError):
        return False


def map_rows(folder: Path, n: int, spans: list[Span], key: Key, columns: int, dtype=np.int64):
    """Every block as one array of rows (core/h5map.Rows): a block is memory-mapped when first
    read, after its key and size are checked; a missing, stale or damaged block is an error."""
    from retro_toolkit.core.h5map import Rows, mapped

    for start, end in spans:  # attributes only: a bad block is found now, not mid-training
        p = path(folder, start, end, n)
        if not valid(p, end - start, _key(key, start, end)):
            raise RuntimeError(f"block {p} is missing or damaged")

    def open_block(b: int) -> np.ndarray:
        return mapped(path(folder, *spans[b], n), "data")

    return Rows([e - s for s, e in spans], open_block, (columns,), dtype)


def write(p: Path, data: np.ndarray, key: str = "", **attrs: object) -> None:
    import h5py

    with files.atomic_path(p) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("data", data=data)
        f.attrs.update(attrs)
        f.attrs["rows"] = len(data)
        f.attrs["key"] = key
        f.attrs["complete"] = True


def compute_missing(
    folder: Path,
    n: int,
    spans: list[Span],
    compute: Callable[[int, int], np.ndarray],
    key: Key,
    rank: int = 0,
    world_size: int = 1,
    on_block: Callable[[int, int, str], None] | None = None,
) -> dict[str, int]:
    """Compute this rank's missing blocks (round-robin over ranks); count what happened."""
    counts = {"computed": 0, "reused": 0, "rebuilt": 0}
    folder.mkdir(parents=True, exist_ok=True)
    for i, (start, end) in enumerate(spans):
        if i % world_size != rank:
            continue
        p = path(folder, start, end, n)
        block_key = _key(key, start, end)
        if valid(p, end - start, block_key):
            counts["reused"] += 1
            state = "reused"
        else:
            state = "rebuilt" if p.exists() else "computed"
            counts[state] += 1
            write(p, compute(start, end), key=block_key)
        if on_block:
            on_block(start, end, state)
    return counts


def iter_blocks(folder: Path, n: int, spans: list[Span], key: Key) -> Iterator[tuple[int, int, np.ndarray]]:
    for start, end in spans:
        data = read(path(folder, start, end, n), end - start, _key(key, start, end))
        if data is None:
            raise RuntimeError(f"block {path(folder, start, end, n)} is missing or damaged")
        yield start, end, data


def stale_files(folder: Path, n: int, spans: list[Span]) -> list[Path]:
    """Block files that do not belong to the current layout (another block size or N)."""
    if not folder.is_dir():
        return []
    keep = {path(folder, s, e, n).name for s, e in spans}
    return [f for f in folder.glob("*.h5") if f.name not in keep]


def remove(paths: list[Path]) -> None:
    for f in paths:
        try:
            os.remove(f)
        except FileNotFoundError:
            pass
