"""Stage `build_db`: chunk DB -> BERT embeddings -> faiss index -> neighbours of every split.

Every long step is a set of block files, resumable and split round-robin over torchrun
ranks. Blocks are keyed by their content (the tokens they embed, the embedder, the
index they searched), so a rerun reuses exactly what is still valid: after a kill, only
missing blocks are computed; after extra corpora are added (`retrieval.extra_sources`),
only the new chunks are embedded, the trained index is reused (not retrained), and every
query is searched again. The index is trained and filled by rank 0, then read by all.
Each query chunk keeps `retrieval.num_candidates` neighbour candidates, more than k, so
that a training sample can drop those from its own documents (collections/retrieval/neighbors.py).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

from retro_toolkit.collections.retrieval import blocks, chunk_db, index as faiss_index, index_build, neighbors
from retro_toolkit.collections.retrieval.embedder import BertEmbedder, threads_per_rank
from retro_toolkit.collections.retrieval.keys import chunk_block_key, sha as _sha
from retro_toolkit.collections.retrieval.neighbors import NEIGHBORS_DIR, NEIGHBORS_META
from retro_toolkit.collections.text import token_stream as ts
from retro_toolkit.collections.text.sources import check_token_sources
from retro_toolkit.collections.text.tokenizer import Tokenizer, workdir_tokenizer
from retro_toolkit.core import dist, files
from retro_toolkit.core.stage import StageContext, StageResult

EMBEDDINGS_DIR = "db/embeddings"
QUERY_EMBEDDINGS_DIR = "db/query_embeddings"
SAMPLE_EMBEDDINGS_DIR = "db/sample_embeddings"  # with retrieval.keep_embeddings: false
EXTRA_DIR = "db/extra"


def chunk_text(tok: Tokenizer, ids: np.ndarray) -> str:
    """Text of a token window; documents inside it are joined by a blank line."""
    pieces, cur = [], []
    for t in np.asarray(ids).tolist():
        if t == tok.eod_id:
            pieces.append(cur)
            cur = []
        else:
            cur.append(t)
    pieces.append(cur)
    return "\n\n".join(tok.decode(p) for p in pieces if p)


def _extra_stream(ctx: StageContext, tok: Tokenizer) -> ts.TokenStream | None:
    """Tokenize retrieval.extra_sources into db/extra (every rank its shards, as prepare_corpus
    does), reusing a matching earlier run."""
    from retro_toolkit.collections.text.tokenize_shards import ShardedRead

    sources = ctx.recipe.retrieval.extra_sources
    if not sources:
        return None
    folder = ctx.workdir / EXTRA_DIR
    key = _sha([dict(s) for s in sources], tok.sha256)
    meta_file = folder / "meta.json"
    stale = dist.broadcast_object(not meta_file.is_file() or files.read_json(meta_file).get("key") != key)
    if stale:
        ctx.log(f"tokenizing {len(sources)} extra corpora (retrieved from, not trained on)")
        if ctx.env.is_main:
            check_token_sources(sources, tok, "retrieval.extra_sources")
        data = ctx.recipe.data
        read = ShardedRead(sources, data.on_invalid_utf8, None, data.shard_mb, ctx.env, "retrieval.extra_sources",
                           tok.eod_id)
        dtype = ts.dtype_for_vocab(tok.vocab_size)
        progress = ctx.progress("tokenize extra", read.my_units(), "documents")
        read.tokenize(tok, dtype, folder, ("extra",), lambda i: "extra", data.tokenize_batch_docs, progress)
        progress.close()
        dist.barrier()
        if ctx.env.is_main:
            counts = read.merge(folder, "extra")
            shutil.rmtree(folder / ".parts")
            files.write_json(meta_file, {"key": key, "dtype": dtype.name, "special_ids": tok.special_ids(),
                                         "tokenizer_sha256": tok.sha256, "splits": {"extra": counts}})
    dist.barrier()
    return ts.TokenStream(folder, "extra")


def run(ctx: StageContext) -> StageResult:
    r, env = ctx.recipe, ctx.env
    cfg, m, k = r.retrieval, r.model.chunk_length, r.model.num_neighbors
    c = neighbors.num_candidates(cfg.num_candidates, k, cfg.k_query)
    w = ctx.workdir
    tok = workdir_tokenizer(w)
    train = ts.TokenStream(w / ts.CORPUS_DIR, "train")
    extra = _extra_stream(ctx, tok)
    streams = [train] + ([extra] if extra else [])

    # 1. chunk database: train documents, then extra corpora
    if env.is_main:
        chunk_db.build([("train", train.doc_offsets)] + ([("extra", extra.doc_offsets)] if extra else []),
                       m, w / chunk_db.CHUNKS_FILE)
    dist.barrier()
    db = chunk_db.load(w / chunk_db.CHUNKS_FILE)
    tokens = chunk_db.PartTokens([s.tokens for s in streams], db.part_tokens)
    n, n_train = len(db), int(db.part_chunks[1])
    ctx.log(f"{n} database chunks of up to {m} tokens ({n_train} from train"
            + (f", {n - n_train} from extra corpora" if extra else "") + ")")
    string = cfg.index.string
    if string != "auto":
        faiss_index.check_fits(string, min(n_train, cfg.index.ntrain or n_train))

    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # ranks sharing this machine's cores
    embedder = BertEmbedder(cfg.embedder.path, cfg.embedder.max_tokens, cfg.embedder.batch_size,
                            threads=threads_per_rank(local))
    faiss_index.set_threads(local)
    if string == "auto":
        string = faiss_index.auto_string(n, embedder.dim, cfg.index.memory_gb)
        ctx.log(f"index.string auto -> {string}")
    embedder_id = (cfg.embedder.path, cfg.embedder.max_tokens, embedder.dim)

    # 2. embeddings of database chunks, block by block
    spans = blocks.ranges(n, cfg.block_size, boundaries=db.part_chunks[1:-1])
    emb_dir = w / EMBEDDINGS_DIR

    def texts_of(rows) -> list[str]:  # rows: a slice or an array of chunk ids
        return [chunk_text(tok, tokens[s:e]) for s, e in zip(db.chunk_start[rows], db.chunk_end[rows])]

    def chunk_texts(start: int, end: int) -> list[str]:
        return texts_of(slice(start, end))

    def emb_key(start: int, end: int) -> str:  # a block's chunks lie in one part of the database
        part = int(np.searchsorted(db.part_tokens, db.chunk_start[start], side="right") - 1)
        base = int(db.part_tokens[part])
        return chunk_block_key(embedder_id, tokens.streams[part], np.asarray(db.chunk_start[start:end]) - base,
                               np.asarray(db.chunk_end[start:end]) - base)

    emb_keys = _gathered_keys(spans, emb_key, env)
    progress = ctx.progress("embed", n, "chunks")

    def skipped(start: int, end: int, state: str) -> None:
        if state == "reused":
            progress.update((end - start) * env.world_size)

    def embed(texts: list[str]) -> np.ndarray:
        return embedder.embed(texts, lambda b: progress.update(b * env.world_size))

    counts = {"computed": 0, "rebuilt": 0}
    if cfg.keep_embeddings:
        counts = blocks.compute_missing(emb_dir, n, spans, lambda s, e: embed(chunk_texts(s, e)),
                                        lambda s, e: emb_keys[s], env.rank, env.world_size, on_block=skipped)
        timings = {"embed_s": round(progress.close(), 3)}
        if counts["rebuilt"]:
            print(f"[build_db] rank {env.rank}: {counts['rebuilt']} damaged or stale embedding block(s) rebuilt", flush=True)
        dist.barrier()
        if env.is_main:
            blocks.remove(blocks.stale_files(emb_dir, n, spans))

    # 3. index: trained on train chunks only (so extra corpora never retrain it), then filled
    sample = faiss_index.training_sample(n_train, cfg.index.ntrain, cfg.seed)
    plan = index_build.IndexPlan(string, embedder.dim, n, spans, emb_keys, "",
                                 w / "index" / faiss_index.folder_name(string))
    t_index = time.monotonic()
    if cfg.keep_embeddings:
        train_spans = [sp for sp in spans if sp[1] <= n_train]
        plan.train_key = _sha(string, sample, [emb_keys[s] for s, _ in train_spans])

        def training_vectors() -> np.ndarray:
            vectors = np.empty((len(sample), embedder.dim), dtype=np.float32)
            for start, end, data in blocks.iter_blocks(emb_dir, n, train_spans, lambda s, e: emb_keys[s]):
                lo, hi = np.searchsorted(sample, [start, end])
                vectors[lo:hi] = data[sample[lo:hi] - start]
            return vectors

        index_build.build(ctx, plan, training_vectors,
                          lambda s, e: blocks.read(blocks.path(emb_dir, s, e, n), e - s, emb_keys[s]))
    else:  # only the training sample's embeddings are stored; every block is embedded as it is encoded
        sample_dir, sample_spans = w / SAMPLE_EMBEDDINGS_DIR, blocks.ranges(len(sample), cfg.block_size)

        def sample_key(s: int, e: int) -> str:  # sampled chunks are train chunks: the train stream's tokens
            return chunk_block_key(embedder_id, train.tokens, db.chunk_start[sample[s:e]], db.chunk_end[sample[s:e]])

        sample_keys = _gathered_keys(sample_spans, sample_key, env)
        plan.train_key = _sha("sample", string, sample, [sample_keys[s] for s, _ in sample_spans])

        def embed_sample() -> None:
            ctx.log(f"embedding the {len(sample)} chunks the index is trained on")
            blocks.compute_missing(sample_dir, len(sample), sample_spans, lambda s, e: embedder.embed(texts_of(sample[s:e])),
                                   lambda s, e: sample_keys[s], env.rank, env.world_size)
            dist.barrier()

        index_build.build(ctx, plan, lambda: np.concatenate([d for *_, d in blocks.iter_blocks(
            sample_dir, len(sample), sample_spans, lambda s, e: sample_keys[s])]),
            lambda s, e: embed(chunk_texts(s, e)), before_training=embed_sample)
        timings = {"embed_s": round(progress.close(), 3)}
        if env.is_main:  # what an earlier run with keep_embeddings kept
            shutil.rmtree(w / EMBEDDINGS_DIR, ignore_errors=True)
            shutil.rmtree(w / QUERY_EMBEDDINGS_DIR, ignore_errors=True)
    fill_key = plan.fill_key
    dist.barrier()
    # Once per rank, memory-mapped: the ranks of a node share one copy in the page cache.
    index = faiss_index.load(plan.folder / "added.faissindex", mmap=True)
    faiss_index.set_nprobe(index, cfg.index.nprobe)
    search_index = lambda q, k: faiss_index.search(index, q, k)  # noqa: E731
    if cfg.index.gpu_search and faiss_index.num_gpus() > 0:
        on_gpu = faiss_index.to_gpu(index, env.local_rank % faiss_index.num_gpus())
        if on_gpu is not index:
            search_index = on_gpu.search

    # 4. neighbours of every query chunk of every split
    timings["index_s"] = round(time.monotonic() - t_index, 3)
    summary: dict = {"db_chunks": n, "index": string, "embedding_blocks_computed": counts["computed"] + counts["rebuilt"],
                     "timings": timings}
    splits_meta = {}
    for split in cfg.query_splits:
        stream = ts.TokenStream(w / ts.CORPUS_DIR, split)
        nq = neighbors.num_query_chunks(len(stream), m)
        q_spans = blocks.ranges(nq, cfg.block_size)
        q_dir, nb_dir = w / QUERY_EMBEDDINGS_DIR / split, w / NEIGHBORS_DIR / split
        progress = ctx.progress(f"neighbours {split}", nq, "queries")
        t_split = time.monotonic()

        def q_texts(start: int, end: int, stream=stream) -> list[str]:
            return [chunk_text(tok, x) for x in neighbors.query_windows(stream.tokens, start, end, m)]

        def q_key(start: int, end: int, stream=stream) -> str:
            return _sha(embedder_id, np.asarray(stream.tokens[start * m:end * m]))

        if cfg.keep_embeddings:
            blocks.compute_missing(q_dir, nq, q_spans, lambda s, e: embed(q_texts(s, e)), q_key, env.rank,
                                   env.world_size, on_block=skipped)

        def search(start: int, end: int, stream=stream, split=split, q_dir=q_dir) -> np.ndarray:
            emb = blocks.read(blocks.path(q_dir, start, end, nq), end - start, q_key(start, end)) \
                if cfg.keep_embeddings else embed(q_texts(start, end))
            _, cand = search_index(emb, min(cfg.k_query, n))
            lo = hi = None
            if split == db.split:  # the database holds this split's documents
                lo, hi = neighbors.banned_doc_range(stream.doc_offsets, len(stream), start, end, m)
            # more than k: the dataset drops those from its sample's other documents
            return neighbors.filter_candidates(cand, db.chunk_doc[np.clip(cand, 0, n - 1)], lo, hi, c)

        nb_key = lambda s, e, q_key=q_key: _sha(q_key(s, e), fill_key, c, cfg.k_query, cfg.index.nprobe)  # noqa: E731
        dist.barrier()  # every rank's query embeddings are on disk before anyone searches
        blocks.compute_missing(nb_dir, nq, q_spans, search, nb_key, env.rank, env.world_size)
        progress.close()
        if env.is_main:
            for folder in (q_dir, nb_dir):
                blocks.remove(blocks.stale_files(folder, nq, q_spans))
        splits_meta[split] = {"query_chunks": nq, "tokens": len(stream), "keys": [nb_key(s, e) for s, e in q_spans]}
        summary[f"{split}_queries"] = nq
        timings[f"neighbors_{split}_s"] = round(time.monotonic() - t_split, 3)
    dist.barrier()

    if cfg.validate_fraction > 0 and env.is_main:
        summary.update(_validate(spans, cfg.validate_fraction, cfg.seed, emb_dir, n, emb_keys, embedder, chunk_texts, ctx))
    if env.is_main:
        files.write_json(w / NEIGHBORS_META, {
            "chunk_length": m, "num_neighbors": k, "num_candidates": c, "k_query": cfg.k_query, "index": string,
            "db_chunks": n, "tokenizer_sha256": train.meta["tokenizer_sha256"], "block_size": cfg.block_size, "splits": splits_meta,
        })
    outputs = [chunk_db.CHUNKS_FILE, f"index/{faiss_index.folder_name(string)}/added.faissindex", NEIGHBORS_META]
    return StageResult(outputs=outputs, summary=summary)


def _gathered_keys(spans: list[tuple[int, int]], key, env) -> dict[int, str]:
    """Every block's key by its first row: each rank hashes its own blocks (round-robin)."""
    mine = {s: key(s, e) for i, (s, e) in enumerate(spans) if i % env.world_size == env.rank}
    return {s: k for part in dist.all_gather_object(mine) for s, k in part.items()}


def _validate(spans, fraction, seed, emb_dir, n, emb_keys, embedder, chunk_texts, ctx) -> dict:
    """Recompute a random fraction of finished embedding blocks; compare bit for bit."""
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(spans), size=max(1, round(fraction * len(spans))), replace=False))
    bad = []
    for i in pick:
        s, e = spans[i]
        stored = blocks.read(blocks.path(emb_dir, s, e, n), e - s, emb_keys[s])
        if stored is None or not np.array_equal(stored, embedder.embed(chunk_texts(s, e))):
            bad.append(f"{s}-{e}")
    ctx.log(f"validated {len(pick)} embedding block(s): "
            + ("all identical" if not bad else f"{len(bad)} MISMATCH: {', '.join(bad)}"))
    return {"validated_blocks": len(pick), "validation_mismatches": len(bad)}


def database_tokens(workdir: Path, db: chunk_db.ChunkDB) -> chunk_db.PartTokens:
    """The database's tokens by global position: the train stream, then extra corpora."""
    streams = [ts.TokenStream(workdir / ts.CORPUS_DIR, "train").tokens]
    if "extra" in db.parts:
        streams.append(ts.TokenStream(workdir / EXTRA_DIR, "extra").tokens)
    return chunk_db.PartTokens(streams, db.part_tokens)
