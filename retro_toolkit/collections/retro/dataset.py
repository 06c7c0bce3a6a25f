"""Retro training samples: windows of a split's token stream plus their chunks' neighbours.

A sample is seq_length + 1 tokens starting at a multiple of seq_length (itself a
multiple of the chunk length m), so sample chunk c is stream chunk start/m + c and its
neighbours come from row start/m + c of neighbors/<split>: one neighbour build serves any
sequence length, seed, sample count or epoch count. As in Retro, no sample sees a
neighbour from one of its own documents: each row holds more candidates than k, and a
train sample drops those from the documents its window touches (the database holds the
train documents only, so valid/test samples drop nothing), then keeps the first k in
rank order, -1 when fewer remain. Windows are shuffled per epoch from the seed.
Candidate ids are read once into memory (8 bytes per candidate and chunk), never one
file per sample; neighbour tokens come from the database's memory-mapped streams.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from retro_toolkit.collections.retrieval import chunk_db, neighbors
from retro_toolkit.collections.retro import blend
from retro_toolkit.collections.retrieval.build_db import NEIGHBORS_META, database_tokens
from retro_toolkit.collections.retrieval.neighbors import map_neighbors
from retro_toolkit.collections.text.token_stream import CORPUS_DIR, TokenStream
from retro_toolkit.core import files
from retro_toolkit.errors import UserError


def check_neighbors(meta: dict, split: str, stream: TokenStream, chunk_length: int, k: int, where: Path) -> None:
    """The neighbour build must be the one for this stream; name the setting that differs."""
    fix = "rerun build_db for this recipe (retro-run RECIPE --force build_db)."
    if meta["chunk_length"] != chunk_length:
        raise UserError(f"{where}: neighbours were built with chunk length {meta['chunk_length']}, "
                        f"model.chunk_length is {chunk_length}; {fix}")
    if "num_candidates" not in meta:
        raise UserError(f"{where}: neighbours were built before samples dropped neighbours from their own "
                        f"documents (no extra candidates per chunk); {fix}")
    if meta["num_neighbors"] < k:
        raise UserError(f"{where}: neighbours were built with k = {meta['num_neighbors']}, "
                        f"model.num_neighbors is {k}; {fix}")
    if meta["tokenizer_sha256"] != stream.meta["tokenizer_sha256"]:
        raise UserError(f"{where}: neighbours were built with another tokenizer than the corpus' "
                        f"(sha256 {meta['tokenizer_sha256'][:12]} vs {stream.meta['tokenizer_sha256'][:12]}); {fix}")
    if split not in meta["splits"]:
        raise UserError(f"{where}: no neighbours for split '{split}' (built: {', '.join(meta['splits'])}); "
                        "add it to retrieval.query_splits and rerun build_db.")
    s = meta["splits"][split]
    if s["tokens"] != len(stream):
        raise UserError(f"{where}: neighbours of split '{split}' cover {s['tokens']} tokens but the corpus has "
                        f"{len(stream)} (the corpus changed); {fix}")


class RetroDataset:
    def __init__(
        self,
        workdir: str | os.PathLike,
        split: str,
        seq_length: int,
        chunk_length: int,
        num_neighbors: int,
        retrieved_length: int,
        pad_id: int,
        seed: int = 1234,
        num_samples: int | None = None,
        with_neighbors: bool = True,
        shuffle: bool = True,
        source_weights: list[float] | None = None,
    ) -> None:
        if seq_length % chunk_length:
            raise UserError(f"seq_length {seq_length} is not a multiple of the chunk length {chunk_length}.")
        w = Path(workdir)
        self.stream = TokenStream(w / CORPUS_DIR, split)
        self.seq_length, self.m, self.k, self.r, self.pad_id = seq_length, chunk_length, num_neighbors, retrieved_length, pad_id
        self.windows = (len(self.stream) - 1) // seq_length
        if self.windows < 1:
            raise UserError(f"split '{split}' has {len(self.stream)} tokens, fewer than one sample of "
                            f"seq_length + 1 = {seq_length + 1}; lower model.seq_length or add documents.")
        self.num_samples = num_samples or self.windows
        self.seed, self.shuffle = seed, shuffle
        self._perm: tuple[int, np.ndarray] | None = None
        self.blend = None
        if source_weights is not None:
            docs = self.stream.meta["splits"][split].get("source_documents")
            if docs is None:
                raise UserError(f"{w / CORPUS_DIR / 'meta.json'} predates per-source splits, which "
                                "pretrain.source_weights needs: rerun prepare_corpus (--force prepare_corpus).")
            if len(docs) != len(source_weights):
                raise UserError(f"pretrain.source_weights has {len(source_weights)} weights but the corpus was "
                                f"built from {len(docs)} sources.")
            per_source = blend.source_windows(self.stream.doc_offsets, docs, seq_length, self.windows)
            self.blend = blend.Blend(per_source, list(source_weights), self.num_samples, seed)
        self.with_neighbors = with_neighbors
        if with_neighbors:
            meta_file = w / NEIGHBORS_META
            if not meta_file.is_file():
                raise UserError(f"{meta_file} is missing: run the build_db stage before training Retro.")
            check_neighbors(files.read_json(meta_file), split, self.stream, chunk_length, num_neighbors, meta_file)
            self.neighbors = map_neighbors(w, split)
            self.db = chunk_db.load(w / chunk_db.CHUNKS_FILE)
            # Doc ids of the database's first part are the stream's own (build_db bans the same way).
            self.own_docs = split == self.db.split
            self.db_tokens = database_tokens(w, self.db)

    def __len__(self) -> int:
        return self.num_samples

    def window(self, i: int) -> int:
        """Stream window of sample i: a fresh seeded permutation of all windows each epoch
        (stream order without shuffle)."""
        if self.blend is not None:
            return self.blend.window(i)
        epoch, j = divmod(i, self.windows)
        if not self.shuffle:
            return j
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.windows))
        return int(self._perm[1][j])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        start = self.window(i) * self.seq_length
        tokens = np.asarray(self.stream.tokens[start:start + self.seq_length + 1], dtype=np.int64)
        sample = {"tokens": tokens[:-1], "labels": tokens[1:]}
        if self.with_neighbors:
            first = start // self.m
            cand = self.neighbors[first:first + self.seq_length // self.m]
            lo = hi = None
            if self.own_docs:
                lo, hi = neighbors.sample_doc_range(self.stream.doc_offsets, start, self.seq_length + 1)
            doc = self.db.chunk_doc[np.clip(cand, 0, len(self.db) - 1)]
            ids = neighbors.filter_candidates(cand, doc, lo, hi, self.k)
            sample["neighbor_ids"] = ids
            sample["neighbor_tokens"] = chunk_db.neighbor_tokens(self.db, self.db_tokens, ids, self.r, self.pad_id)
        return sample
