"""The chunk database: every database document cut into m-token chunks.

The database is made of parts: the train split (always first) and, optionally, extra
corpora that are retrieved from but not trained on, one part each. Positions and document
ids are global over the parts laid end to end. Chunks never cross documents; a document's
last chunk may be short; a document's trailing EOD token belongs to no chunk.

Chunk ids never move once neighbours refer to them: a document taken out of the database
(retrieval.remove_sources) keeps its chunk rows as empty ones (chunk_doc -1, no tokens),
and a corpus that left it (dropped from retrieval.extra_sources) keeps its id range as a
"retired:" part of empty rows with no documents and no tokens.

    db/chunks.h5
      chunk_doc    int64 [N]    document of each chunk (index into doc_offsets)
      chunk_start  int64 [N]    first token (global position)
      chunk_end    int64 [N]    one past the last token
      doc_offsets  int64 [D+1]  document d is tokens[doc_offsets[d]:doc_offsets[d+1]] (EOD included)
      part_tokens  int64 [P+1]  global position where each part starts
      part_chunks  int64 [P+1]  first chunk id of each part
      attrs: chunk_length, parts (names, comma-separated), removed_docs
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
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
    empty_chunks: int = 0
    removed_docs: int = 0

    def __len__(self) -> int:
        return len(self.chunk_doc)

    @property
    def split(self) -> str:
        return self.parts[0]

    @property
    def live_chunks(self) -> int:
        return len(self) - self.empty_chunks

    def part_of(self, chunk: int) -> int:
        return int(np.searchsorted(self.part_chunks, chunk, side="right") - 1)

    def empty_in(self, start: int, end: int) -> int:
        """Chunks of [start, end) that are empty (taken out of the database)."""
        return int((np.asarray(self.chunk_doc[start:end]) < 0).sum()) if self.empty_chunks else 0

    def whole_ends(self, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Chunk ends as they were before documents were taken out (an empty chunk kept its start)."""
        gone = ends == starts
        if gone.any():
            ends = ends.copy()
            doc = np.searchsorted(self.doc_offsets, starts[gone], side="right") - 1
            ends[gone] = np.minimum(starts[gone] + self.chunk_length, np.asarray(self.doc_offsets[doc + 1]) - 1)
        return ends

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


@dataclass
class Part:
    """One part of the database. doc_offsets: its stream's document offsets (a memory map is
    read a block of documents at a time); None for a retired part, whose `reserved` chunk ids
    stay empty. removed: sorted indexes (within the part) of documents taken out."""

    name: str
    doc_offsets: np.ndarray | None
    removed: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    reserved: int = 0

    def docs(self) -> int:
        return 0 if self.doc_offsets is None else len(self.doc_offsets) - 1

    def tokens(self) -> int:
        return 0 if self.doc_offsets is None else int(self.doc_offsets[-1])

    def chunks(self, m: int) -> int:
        if self.doc_offsets is None:
            return self.reserved
        n = 0
        for lo in range(0, self.docs(), BUILD_DOCS):
            block = np.asarray(self.doc_offsets[lo:lo + BUILD_DOCS + 1], dtype=np.int64)
            n += int((-(-((block[1:] - 1) - block[:-1]) // m)).sum())
        return n


def build(parts: list[Part], m: int, out: Path) -> ChunkDB:
    """Write the chunk DB of `parts`; returns it, memory-mapped."""
    import h5py

    part_tokens = np.concatenate([[0], np.cumsum([p.tokens() for p in parts])]).astype(np.int64)
    part_chunks = np.concatenate([[0], np.cumsum([p.chunks(m) for p in parts])]).astype(np.int64)
    n_docs = sum(p.docs() for p in parts)
    with files.atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        cols = {name: f.create_dataset(name, (int(part_chunks[-1]),), np.int64)
                for name in ("chunk_doc", "chunk_start", "chunk_end")}
        offsets = f.create_dataset("doc_offsets", (n_docs + 1,), np.int64)
        offsets[0] = 0
        doc_base, empty = 0, 0
        for p, base, chunk_at in zip(parts, part_tokens, part_chunks):
            if p.doc_offsets is None:  # a retired part: its ids stay, empty
                for name, value in (("chunk_doc", -1), ("chunk_start", base), ("chunk_end", base)):
                    cols[name][chunk_at:chunk_at + p.reserved] = value
                empty += p.reserved
                continue
            for lo in range(0, p.docs(), BUILD_DOCS):
                block = np.asarray(p.doc_offsets[lo:lo + BUILD_DOCS + 1], dtype=np.int64) + base
                doc, start, end = cut_chunks(block, m)
                gone = np.isin(doc + lo, p.removed)
                doc = doc + doc_base + lo
                doc[gone], end[gone] = -1, start[gone]
                empty += int(gone.sum())
                for name, col in (("chunk_doc", doc), ("chunk_start", start), ("chunk_end", end)):
                    cols[name][chunk_at:chunk_at + len(doc)] = col
                offsets[doc_base + lo + 1:doc_base + lo + len(block)] = block[1:]
                chunk_at += len(doc)
            doc_base += p.docs()
        f["part_tokens"] = part_tokens
        f["part_chunks"] = part_chunks
        f.attrs.update(chunk_length=m, parts=",".join(p.name for p in parts), empty_chunks=empty,
                       removed_docs=sum(len(p.removed) for p in parts))
    return load(out)


def load(path: str | os.PathLike) -> ChunkDB:
    """The database with its per-chunk and per-document columns memory-mapped (core/h5map.py):
    a rank pages in the chunks it reads, not all of them."""
    import h5py

    from retro_toolkit.core.h5map import mapped

    with h5py.File(path, "r") as f:
        m, parts = int(f.attrs["chunk_length"]), str(f.attrs["parts"]).split(",")
        part_tokens, part_chunks = f["part_tokens"][:], f["part_chunks"][:]
        empty, removed = int(f.attrs.get("empty_chunks", 0)), int(f.attrs.get("removed_docs", 0))
    return ChunkDB(mapped(path, "chunk_doc"), mapped(path, "chunk_start"), mapped(path, "chunk_end"),
                   mapped(path, "doc_offsets"), m, parts, part_tokens, part_chunks, empty, removed)


def neighbor_tokens(db: ChunkDB, tokens, ids: np.ndarray, r: int, pad_id: int) -> np.ndarray:
    """Tokens of each neighbour chunk plus its continuation: [..., r], int64.

    `tokens` is indexable by global position (an array, or PartTokens). The continuation
    stays inside the neighbour's document (padded with pad_id at the document end); a
    missing neighbour (-1), or an empty chunk (a document taken out), is all -1 and is never
    dereferenced.
    """
    ids = np.asarray(ids, dtype=np.int64)
    flat = ids.reshape(-1)
    present = flat >= 0
    if present.any():
        present[present] = np.asarray(db.chunk_doc[flat[present]]) >= 0
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
