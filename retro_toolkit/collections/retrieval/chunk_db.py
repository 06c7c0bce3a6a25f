"""The chunk database: every database document cut into m-token chunks.

Chunks never cross documents; a document's last chunk may be short. A document's
trailing EOD token belongs to no chunk.

    db/chunks.h5
      chunk_doc    int64 [N]    document of each chunk (index into doc_offsets)
      chunk_start  int64 [N]    first token (position in the train token stream)
      chunk_end    int64 [N]    one past the last token
      doc_offsets  int64 [D+1]  document d is stream[doc_offsets[d]:doc_offsets[d+1]] (EOD included)
      attrs: chunk_length, split, num_tokens
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retro_toolkit.core import files

CHUNKS_FILE = "db/chunks.h5"


@dataclass
class ChunkDB:
    chunk_doc: np.ndarray
    chunk_start: np.ndarray
    chunk_end: np.ndarray
    doc_offsets: np.ndarray
    chunk_length: int
    split: str

    def __len__(self) -> int:
        return len(self.chunk_doc)

    def doc_content_end(self, docs: np.ndarray) -> np.ndarray:
        """Where a document's text ends: its EOD position."""
        return self.doc_offsets[docs + 1] - 1


def cut_chunks(doc_offsets: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc, start, end) of every chunk, vectorised over documents."""
    content = (doc_offsets[1:] - 1) - doc_offsets[:-1]  # tokens before each EOD
    per_doc = -(-content // m)  # ceil
    doc = np.repeat(np.arange(len(content), dtype=np.int64), per_doc)
    first_of_doc = np.concatenate([[0], np.cumsum(per_doc)[:-1]]).astype(np.int64)
    within = np.arange(len(doc), dtype=np.int64) - np.repeat(first_of_doc, per_doc)
    start = doc_offsets[:-1][doc] + within * m
    end = np.minimum(start + m, doc_offsets[1:][doc] - 1)
    return doc, start, end


def build(doc_offsets: np.ndarray, m: int, split: str, out: Path) -> ChunkDB:
    import h5py

    doc, start, end = cut_chunks(np.asarray(doc_offsets, dtype=np.int64), m)
    with files.atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        f["chunk_doc"], f["chunk_start"], f["chunk_end"] = doc, start, end
        f["doc_offsets"] = np.asarray(doc_offsets, dtype=np.int64)
        f.attrs.update(chunk_length=m, split=split, num_tokens=int(doc_offsets[-1]))
    return ChunkDB(doc, start, end, np.asarray(doc_offsets, dtype=np.int64), m, split)


def load(path: str | os.PathLike) -> ChunkDB:
    import h5py

    with h5py.File(path, "r") as f:
        return ChunkDB(
            f["chunk_doc"][:], f["chunk_start"][:], f["chunk_end"][:], f["doc_offsets"][:],
            int(f.attrs["chunk_length"]), str(f.attrs["split"]),
        )


def neighbor_tokens(db: ChunkDB, tokens: np.ndarray, ids: np.ndarray, r: int, pad_id: int) -> np.ndarray:
    """Tokens of each neighbour chunk plus its continuation: [..., r], int64.

    The continuation stays inside the neighbour's document (padded with pad_id at the
    document end); a missing neighbour (-1) is all -1 and is never dereferenced.
    """
    ids = np.asarray(ids, dtype=np.int64)
    flat = ids.reshape(-1)
    present = flat >= 0
    out = np.full((len(flat), r), -1, dtype=np.int64)
    if present.any():
        chunk = flat[present]
        start = db.chunk_start[chunk]
        stop = db.doc_content_end(db.chunk_doc[chunk])
        pos = start[:, None] + np.arange(r, dtype=np.int64)[None, :]
        inside = pos < stop[:, None]
        got = np.asarray(tokens[np.where(inside, pos, start[:, None])], dtype=np.int64)
        out[present] = np.where(inside, got, pad_id)
    return out.reshape(*ids.shape, r)
