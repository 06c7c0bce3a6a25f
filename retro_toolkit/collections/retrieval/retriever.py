"""Retriever: a finished work directory's database, searchable from Python.

    r = Retriever("runs/smoke")
    hits = r.search(["How do I open a file?"], k=2)
    hits.ids        [n, k] chunk ids (-1 = none)
    hits.distances  [n, k] squared L2
    hits.tokens     [n, k, r] neighbour chunk + continuation tokens (-1 = missing, pad after the document end)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retro_toolkit.collections.retrieval import chunk_db, index as faiss_index
from retro_toolkit.collections.retrieval.build_db import NEIGHBORS_META, chunk_text, database_tokens
from retro_toolkit.collections.retrieval import db_version
from retro_toolkit.collections.retrieval.embedder import BertEmbedder
from retro_toolkit.collections.text.tokenizer import workdir_tokenizer
from retro_toolkit.core import files
from retro_toolkit.errors import UserError


@dataclass
class Hits:
    ids: np.ndarray
    distances: np.ndarray
    tokens: np.ndarray


class Retriever:
    def __init__(self, workdir: str | os.PathLike, embedder: BertEmbedder | None = None) -> None:
        from retro_toolkit.recipe import load_recipe

        self.workdir = Path(workdir)
        meta_file = self.workdir / NEIGHBORS_META
        if not meta_file.is_file():
            raise UserError(f"{self.workdir} has no retrieval database ({meta_file} is missing): run the build_db stage.")
        self.meta = files.read_json(meta_file)
        self.version = db_version.read(self.workdir)  # read first: a newer database means opening again
        self.recipe = load_recipe(str(self.workdir / "recipe.resolved.yaml"))
        self.tokenizer = workdir_tokenizer(self.workdir)
        self.db = chunk_db.load(self.workdir / chunk_db.CHUNKS_FILE)
        self.tokens = database_tokens(self.workdir, self.db)
        self.chunk_length = self.db.chunk_length
        self.retrieved_length = self.recipe.model.num_retrieved_chunks * self.chunk_length
        self.index = faiss_index.load(self.workdir / "index" / faiss_index.folder_name(self.meta["index"]) / "added.faissindex")
        faiss_index.set_nprobe(self.index, self.recipe.retrieval.index.nprobe)
        e = self.recipe.retrieval.embedder
        self.embedder = embedder or BertEmbedder(e.path, e.max_tokens, e.batch_size)

    def __len__(self) -> int:
        return self.db.live_chunks

    def outdated(self) -> bool:
        """Whether build_db has written another database version since this one was opened."""
        now = db_version.read(self.workdir)
        return (now or {}).get("key") != (self.version or {}).get("key")

    def search(self, queries: list[str] | list[np.ndarray] | np.ndarray, k: int | None = None) -> Hits:
        """Nearest database chunks of texts or of token chunks (decoded with the decoder tokenizer)."""
        k = k or self.recipe.model.num_neighbors
        texts = [q if isinstance(q, str) else chunk_text(self.tokenizer, np.asarray(q)) for q in queries]
        dist, ids = faiss_index.search(self.index, self.embedder.embed(texts), k)
        ids = ids.astype(np.int64)
        return Hits(ids, dist, self.neighbor_tokens(ids))

    def neighbor_tokens(self, ids: np.ndarray) -> np.ndarray:
        return chunk_db.neighbor_tokens(self.db, self.tokens, ids, self.retrieved_length, self.tokenizer.pad_id)

    def chunk_text(self, chunk_id: int, with_continuation: bool = False) -> str:
        if with_continuation:
            toks = self.neighbor_tokens(np.array([chunk_id]))[0]
            toks = toks[(toks >= 0) & (toks != self.tokenizer.pad_id)]
        else:
            toks = self.tokens[self.db.chunk_start[chunk_id] : self.db.chunk_end[chunk_id]]
        return chunk_text(self.tokenizer, toks)
