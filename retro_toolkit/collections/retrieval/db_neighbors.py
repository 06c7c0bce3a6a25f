"""build_db's last step: the neighbour candidates of every query split, searched in the filled index.

The train split's candidates are what a model trains on. Once one was, and the runner found
that only the database's contents changed (StageContext.keep_trained: corpora added to,
replaced in or dropped from it, documents taken out), they are kept as they were and only
the other splits are searched again: chunk ids never move while they are kept
(db_sources.plan_parts), and a chunk taken out is dropped from them when they are read
(neighbors.filter_candidates). retrieval.train_neighbors=recompute searches them again.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from retro_toolkit.collections.retrieval import blocks, chunk_db, index as faiss_index, index_build, neighbors
from retro_toolkit.collections.retrieval.keys import sha
from retro_toolkit.collections.retrieval.neighbors import NEIGHBORS_DIR
from retro_toolkit.collections.text import token_stream as ts
from retro_toolkit.core import dist
from retro_toolkit.core.stage import StageContext

QUERY_EMBEDDINGS_DIR = "db/query_embeddings"


class Splits:
    def __init__(self, ctx: StageContext, tok, embedder_id: tuple, c: int, old_meta: dict | None) -> None:
        self.ctx, self.tok, self.embedder_id, self.c, self.old = ctx, tok, embedder_id, c, old_meta or {}

    def keeps_train(self) -> bool:
        """Whether the train split's neighbours stay as a model read them."""
        cfg, w = self.ctx.recipe.retrieval, self.ctx.workdir
        old = self.old.get("splits", {}).get("train")
        if not self.ctx.keep_trained or "train" not in cfg.query_splits or old is None \
                or self.old.get("num_candidates") != self.c or self.old.get("block_size") != cfg.block_size:
            return False
        trained = (w / "stages" / "pretrain.json").is_file() or (w / "checkpoints" / "pretrain").is_dir()
        n = old["query_chunks"]
        whole = all(blocks.valid(blocks.path(w / NEIGHBORS_DIR / "train", s, e, n), e - s, key)
                    for (s, e), key in zip(blocks.ranges(n, cfg.block_size), old["keys"]))
        return dist.broadcast_object(trained and whole)

    def search(self, db: chunk_db.ChunkDB, plan: index_build.IndexPlan, embed: Callable,
               summary: dict[str, Any], version: int, kept: bool) -> dict[str, Any]:
        """Search every query split (the train split's not, when `kept`: keeps_train's answer);
        returns neighbors/meta.json's "splits"."""
        ctx, env, cfg = self.ctx, self.ctx.env, self.ctx.recipe.retrieval
        index = faiss_index.load(plan.folder / "added.faissindex", mmap=True)  # ranks of a node share its pages
        faiss_index.set_nprobe(index, cfg.index.nprobe)
        search_index = lambda q, k: faiss_index.search(index, q, k)  # noqa: E731
        if cfg.index.gpu_search and faiss_index.num_gpus() > 0:
            on_gpu = faiss_index.to_gpu(index, env.local_rank % faiss_index.num_gpus())
            if on_gpu is not index:
                search_index = on_gpu.search
        summary["train_neighbors"] = "kept" if kept else "searched" if "train" in cfg.query_splits else "none"
        out = {}
        for split in cfg.query_splits:
            if split == "train" and kept:
                out[split] = self.old["splits"]["train"]
                ctx.log(f"train neighbours kept as trained on (database version {out[split].get('database_version', 1)})")
                continue
            out[split] = self._split(split, db, search_index, plan.fill_key, embed, summary)
            out[split]["database_version"] = version
        dist.barrier()
        return out

    def _split(self, split, db, search_index, fill_key, embed, summary) -> dict[str, Any]:
        ctx, env, cfg, m = self.ctx, self.ctx.env, self.ctx.recipe.retrieval, self.ctx.recipe.model.chunk_length
        w, n, c = ctx.workdir, len(db), self.c
        stream = ts.TokenStream(w / ts.CORPUS_DIR, split)
        nq = neighbors.num_query_chunks(len(stream), m)
        q_spans = blocks.ranges(nq, cfg.block_size)
        q_dir, nb_dir = w / QUERY_EMBEDDINGS_DIR / split, w / NEIGHBORS_DIR / split
        progress = ctx.progress(f"neighbours {split}", nq, "queries")
        t_split = time.monotonic()
        from retro_toolkit.collections.retrieval.build_db import chunk_text

        def q_texts(start: int, end: int) -> list[str]:
            return [chunk_text(self.tok, x) for x in neighbors.query_windows(stream.tokens, start, end, m)]

        def q_key(start: int, end: int) -> str:
            return sha(self.embedder_id, np.asarray(stream.tokens[start * m:end * m]))

        if cfg.keep_embeddings:
            blocks.compute_missing(q_dir, nq, q_spans, lambda s, e: embed(q_texts(s, e)), q_key, env.rank,
                                   env.world_size)

        def search(start: int, end: int) -> np.ndarray:
            emb = blocks.read(blocks.path(q_dir, start, end, nq), end - start, q_key(start, end)) \
                if cfg.keep_embeddings else embed(q_texts(start, end))
            _, cand = search_index(emb, min(cfg.k_query, db.live_chunks))
            lo = hi = None
            if split == db.split:  # the database holds this split's documents
                lo, hi = neighbors.banned_doc_range(stream.doc_offsets, len(stream), start, end, m)
            # more than k: the dataset drops those from its sample's other documents
            return neighbors.filter_candidates(cand, db.chunk_doc[np.clip(cand, 0, n - 1)], lo, hi, c)

        nb_key = lambda s, e: sha(q_key(s, e), fill_key, c, cfg.k_query, cfg.index.nprobe)  # noqa: E731
        dist.barrier()  # every rank's query embeddings are on disk before anyone searches
        blocks.compute_missing(nb_dir, nq, q_spans, search, nb_key, env.rank, env.world_size,
                               on_block=lambda s, e, _: progress.update((e - s) * env.world_size))
        progress.close()
        if env.is_main:
            for folder in (q_dir, nb_dir):
                blocks.remove(blocks.stale_files(folder, nq, q_spans))
        summary[f"{split}_queries"] = nq
        summary["timings"][f"neighbors_{split}_s"] = round(time.monotonic() - t_split, 3)
        return {"query_chunks": nq, "tokens": len(stream), "keys": [nb_key(s, e) for s, e in q_spans]}
