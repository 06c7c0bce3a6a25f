"""Stage `build_db`: chunk DB -> BERT embeddings -> faiss index -> neighbours of every split.

Every long step is a set of block files (resumable, split round-robin over torchrun
ranks); the index is trained and filled by rank 0 and then read by every rank.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from retro_toolkit.collections.retrieval import blocks, chunk_db, index as faiss_index, neighbors
from retro_toolkit.collections.retrieval.embedder import BertEmbedder, threads_per_rank
from retro_toolkit.collections.text.token_stream import CORPUS_DIR, TokenStream
from retro_toolkit.collections.text.tokenizer import Tokenizer
from retro_toolkit.collections.text.tokenizer_stage import MODEL_FILE
from retro_toolkit.core import dist, files
from retro_toolkit.core.stage import StageContext, StageResult

EMBEDDINGS_DIR = "db/embeddings"
NEIGHBORS_DIR = "neighbors"
NEIGHBORS_META = "neighbors/meta.json"


def chunk_text(tok: Tokenizer, ids: np.ndarray) -> str:
    """Text of a token window; documents inside it are joined by a blank line."""
    ids = np.asarray(ids).tolist()
    pieces, cur = [], []
    for t in ids:
        if t == tok.eod_id:
            pieces.append(cur)
            cur = []
        else:
            cur.append(t)
    pieces.append(cur)
    return "\n\n".join(tok.decode(p) for p in pieces if p)


def _key(*parts: object) -> str:
    return files.sha256_of([str(p) for p in parts])


def _db_hash(db: chunk_db.ChunkDB) -> str:
    h = hashlib.sha256()
    for a in (db.chunk_start, db.chunk_end):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _train_and_fill(string: str, dim: int, emb_dir: Path, n: int, block_size: int, key: str,
                    ntrain: int | None, seed: int, out_dir: Path, log) -> None:
    index = faiss_index.make(string, dim)
    if not index.is_trained:
        ids = faiss_index.training_sample(n, ntrain, seed)
        sample = np.empty((len(ids), dim), dtype=np.float32)
        for start, end, data in blocks.iter_blocks(emb_dir, n, block_size, key):
            lo, hi = np.searchsorted(ids, [start, end])
            sample[lo:hi] = data[ids[lo:hi] - start]
        log(f"training {string} on {len(ids)} vectors")
        index.train(sample)
    faiss_index.save(index, out_dir / "trained.faissindex")
    for _, _, data in blocks.iter_blocks(emb_dir, n, block_size, key):
        index.add(data)  # block order = chunk order, so faiss ids are chunk ids
    faiss_index.save(index, out_dir / "added.faissindex")


def run(ctx: StageContext) -> StageResult:
    r, env = ctx.recipe, ctx.env
    cfg, m, k = r.retrieval, r.model.chunk_length, r.model.num_neighbors
    w = ctx.workdir
    tok = Tokenizer(w / MODEL_FILE)
    train = TokenStream(w / CORPUS_DIR, "train")

    # 1. chunk database (train documents)
    if env.is_main:
        chunk_db.build(train.doc_offsets, m, "train", w / chunk_db.CHUNKS_FILE)
    dist.barrier()
    db = chunk_db.load(w / chunk_db.CHUNKS_FILE)
    n = len(db)
    ctx.log(f"{n} database chunks of up to {m} tokens from {train.num_docs} train documents")

    string = cfg.index.string
    if string != "auto":
        ntrain = min(n, cfg.index.ntrain or n)
        faiss_index.check_fits(string, ntrain)

    # 2. embeddings, block by block
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # ranks sharing this machine's cores
    embedder = BertEmbedder(cfg.embedder.path, cfg.embedder.max_tokens, cfg.embedder.batch_size,
                            threads=threads_per_rank(local))
    faiss_index.set_threads(local)
    if string == "auto":
        string = faiss_index.auto_string(n, embedder.dim, cfg.index.memory_gb)
        ctx.log(f"index.string auto -> {string}")
    emb_key = _key(cfg.embedder.path, cfg.embedder.max_tokens, train.meta["tokenizer_sha256"], m, _db_hash(db))
    emb_dir = w / EMBEDDINGS_DIR
    progress = ctx.progress("embed", n, "chunks")

    def embed_chunks(start: int, end: int) -> np.ndarray:
        texts = [chunk_text(tok, train.tokens[s:e]) for s, e in zip(db.chunk_start[start:end], db.chunk_end[start:end])]
        return embedder.embed(texts, on_batch=lambda k: progress.update(k * env.world_size))

    def skipped(start: int, end: int, state: str) -> None:
        if state == "reused":
            progress.update((end - start) * env.world_size)

    counts = blocks.compute_missing(emb_dir, n, cfg.block_size, embed_chunks, emb_key, env.rank, env.world_size,
                                    on_block=skipped)
    progress.close()
    if counts["rebuilt"]:
        print(f"[build_db] rank {env.rank}: {counts['rebuilt']} damaged or stale embedding block(s) rebuilt", flush=True)
    dist.barrier()

    # 3. index (rank 0 trains and adds; the others wait, then read it)
    idx_dir = w / "index" / faiss_index.folder_name(string)
    if env.is_main:
        blocks.remove(blocks.stale_files(emb_dir, n, cfg.block_size))
        _train_and_fill(string, embedder.dim, emb_dir, n, cfg.block_size, emb_key, cfg.index.ntrain, r.seed,
                        idx_dir, ctx.log)
    dist.barrier()
    index = faiss_index.load(idx_dir / "added.faissindex")
    faiss_index.set_nprobe(index, cfg.index.nprobe)

    # 4. neighbours of every query chunk of every split
    summary: dict = {"db_chunks": n, "index": string, "embedding_blocks_computed": counts["computed"]}
    splits_meta = {}
    for split in cfg.query_splits:
        stream = TokenStream(w / CORPUS_DIR, split)
        nq = neighbors.num_query_chunks(len(stream), m)
        key = _key(emb_key, split, string, k, cfg.k_query, cfg.index.nprobe, len(stream), stream.meta["tokenizer_sha256"])
        progress = ctx.progress(f"neighbours {split}", nq, "queries")

        def query(start: int, end: int, stream=stream, split=split) -> np.ndarray:
            texts = [chunk_text(tok, w_) for w_ in neighbors.query_windows(stream.tokens, start, end, m)]
            emb = embedder.embed(texts, on_batch=lambda k: progress.update(k * env.world_size))
            _, cand = index.search(emb, min(cfg.k_query, n))
            cand_doc = db.chunk_doc[np.clip(cand, 0, n - 1)]
            lo = hi = None
            if split == db.split:  # the database holds this split's documents
                lo, hi = neighbors.banned_doc_range(stream.doc_offsets, len(stream), start, end, m)
            return neighbors.filter_candidates(cand, cand_doc, lo, hi, k)

        out_dir = w / NEIGHBORS_DIR / split
        blocks.compute_missing(out_dir, nq, cfg.block_size, query, key, env.rank, env.world_size,
                               on_block=skipped)
        progress.close()
        if env.is_main:
            blocks.remove(blocks.stale_files(out_dir, nq, cfg.block_size))
        splits_meta[split] = {"query_chunks": nq, "tokens": len(stream), "key": key}
        summary[f"{split}_queries"] = nq
    dist.barrier()

    if env.is_main:
        files.write_json(w / NEIGHBORS_META, {
            "chunk_length": m, "num_neighbors": k, "k_query": cfg.k_query, "index": string,
            "db_chunks": n, "tokenizer_sha256": train.meta["tokenizer_sha256"], "block_size": cfg.block_size,
            "splits": splits_meta,
        })
    outputs = [chunk_db.CHUNKS_FILE, f"index/{faiss_index.folder_name(string)}/added.faissindex", NEIGHBORS_META]
    return StageResult(outputs=outputs, summary=summary)
