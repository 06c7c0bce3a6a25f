"""The chunk database: every database document cut into m-token chunks.

The database is made of parts: the train split (always first) and, optionally, extra
corpora that are retrieved from but not trained on. Positions and document ids are
global over the parts laid end to end, so train chunks keep their ids when extra
corpora are added. Chunks never cross documents; a document's last chunk may be short;
a document's trailing EOD token belongs to no chunk.

    db/chunks.h5
      chunk_doc    int64 [N]    document of each chunk (index into doc_offsets)
      chunk_start  int64 [N]    first token (global position)
      chunk_end    int64 [N]    one past the last token
      doc_offsets  int64 [D+1]  document d is tokens[doc_offsets[d]:doc_offsets[d+1]] (EOD included)
      part_tokens  int64 [P+1]  global position where each part starts
      part_chunks  int64 [P+1]  first chunk id of each part
      attrs: chunk_length, parts (names, comma-separated)
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
    parts: list[str]
    part_tokens: np.ndarray
    part_chunks: np.ndarray

    def __len__(self) -> int:
        return len(self.chunk_doc)

    @property
    def split(self) -> str:
        return self.parts[0]

    def doc_content_end(self, docs: np.ndarray) -> np.ndarray:
        """Where a document's text ends: its EOD position."""
        return self.doc_offsets[docs + 1] - 1


class PartTokens:
    """Token streams of the database parts, indexed by global position."""

    def __init__(self, streams: list[np.ndarray], part_tokens: np.ndarray) -> None:
        self.streams, self.part_tokens = streams, part_tokens

    def __len__(self) -> int:
        return int(self.part_tokens[-1])

    def __getitem__(self, pos):
        if isinstance(pos, slice):
            p = int(np.searchsorted(self.part_tokens, pos.start, side="right") - 1)
            base = int(self.part_tokens[p])
            return self.streams[p][pos.start - base : pos.stop - base]
        pos = np.asarray(pos)
        if len(self.streams) == 1:
            return self.streams[0][pos]
        part = np.searchsorted(self.part_tokens, pos, side="right") - 1
        out = np.empty(pos.shape, dtype=np.int64)
        for p, stream in enumerate(self.streams):
            sel = part == p
            if sel.any():
                out[sel] = stream[pos[sel] - self.part_tokens[p]]
        return out


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


BUILD_DOCS = 1 << 13  # documents chunked per step of build: memory is O(this), not O(corpus)


def build(parts: list[tuple[str, np.ndarray]], m: int, out: Path) -> ChunkDB:
    """Chunk DB over parts given as (name, doc_offsets of that part's stream; a memory map is
    read a block of documents at a time). Returns the written database, memory-mapped."""
    import h5py

    part_tokens, counts = [0], []
    for _, doc_offsets in parts:
        part_tokens.append(part_tokens[-1] + int(doc_offsets[-1]))
        n = 0
        for lo in range(0, len(doc_offsets) - 1, BUILD_DOCS):
            block = np.asarray(doc_offsets[lo:lo + BUILD_DOCS + 1], dtype=np.int64)
            n += int((-(-((block[1:] - 1) - block[:-1]) // m)).sum())
        counts.append(n)
    n_docs = sum(len(d) - 1 for _, d in parts)
    part_chunks = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    with files.atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        cols = {name: f.create_dataset(name, (int(part_chunks[-1]),), np.int64)
                for name in ("chunk_doc", "chunk_start", "chunk_end")}
        offsets = f.create_dataset("doc_offsets", (n_docs + 1,), np.int64)
        offsets[0] = 0
        doc_base, chunk_at = 0, 0
        for (_, doc_offsets), base in zip(parts, part_tokens):
            for lo in range(0, len(doc_offsets) - 1, BUILD_DOCS):
                block = np.asarray(doc_offsets[lo:lo + BUILD_DOCS + 1], dtype=np.int64) + base
                doc, start, end = cut_chunks(block, m)
                for name, col in (("chunk_doc", doc + doc_base + lo), ("chunk_start", start), ("chunk_end", end)):
                    cols[name][chunk_at:chunk_at + len(doc)] = col
                offsets[doc_base + lo + 1:doc_base + lo + len(block)] = block[1:]
                chunk_at += len(doc)
            doc_base += len(doc_offsets) - 1
        f["part_tokens"] = np.asarray(part_tokens, dtype=np.int64)
        f["part_chunks"] = part_chunks
        f.attrs.update(chunk_length=m, parts=",".join(name for name, _ in parts))
    return load(out)


def load(path: str | os.PathLike) -> ChunkDB:
    """The database with its per-chunk and per-document columns memory-mapped (core/h5map.py):
    a rank pages in the chunks it reads, not all of them."""
    import h5py

    from retro_toolkit.core.h5map import mapped

    with h5py.File(path, "r") as f:
        m, parts = int(f.attrs["chunk_length"]), str(f.attrs["parts"]).split(",")
        part_tokens, part_chunks = f["part_tokens"][:], f["part_chunks"][:]
    return ChunkDB(mapped(path, "chunk_doc"), mapped(path, "chunk_start"), mapped(path, "chunk_end"),
                   mapped(path, "doc_offsets"), m, parts, part_tokens, part_chunks)


def neighbor_tokens(db: ChunkDB, tokens, ids: np.ndarray, r: int, pad_id: int) -> np.ndarray:
    """Tokens of each neighbour chunk plus its continuation: [..., r], int64.

    `tokens` is indexable by global position (an array, or PartTokens). The continuation
    stays inside the neighbour's document (padded with pad_id at the document end); a
    missing neighbour (-1) is all -1 and is never dereferenced.
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
