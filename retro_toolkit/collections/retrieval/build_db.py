"""Stage `build_db`: chunk DB -> BERT embeddings -> faiss index -> neighbours of every split.

Every long step is a set of block files, resumable and split round-robin over torchrun
ranks. Blocks are keyed by their content (the tokens they embed, the embedder, the
index they searched), so a rerun reuses exactly what is still valid: after a kill, only
missing blocks are computed. An update of the database (corpora added to, replaced in or
dropped from `retrieval.extra_sources`, documents taken out with `retrieval.remove_sources`)
embeds only the new corpora, keeps the trained index (it is refilled from stored codes, not
retrained), searches the query splits again, and keeps the train split's neighbours once a
model was trained on them (db_neighbors.py). The index is trained and filled by rank 0, then
read by all. Each query chunk keeps `retrieval.num_candidates` neighbour candidates, more
than k, so that a training sample can drop those from its own documents (neighbors.py).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

from retro_toolkit.collections.retrieval import (blocks, chunk_db, db_neighbors, db_sources, db_version, index as faiss_index,
                                                 index_build, neighbors)
from retro_toolkit.collections.retrieval.embedder import BertEmbedder
from retro_toolkit.collections.retrieval.keys import chunk_block_key, sha as _sha
from retro_toolkit.collections.retrieval.db_neighbors import QUERY_EMBEDDINGS_DIR
from retro_toolkit.collections.retrieval.neighbors import NEIGHBORS_META
from retro_toolkit.collections.text import token_stream as ts
from retro_toolkit.collections.text.tokenizer import Tokenizer, workdir_tokenizer
from retro_toolkit.core import dist, files
from retro_toolkit.core.stage import StageContext, StageResult
from retro_toolkit.errors import UserError

EMBEDDINGS_DIR = "db/embeddings"
SAMPLE_EMBEDDINGS_DIR = "db/sample_embeddings"  # with retrieval.keep_embeddings: false


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


def run(ctx: StageContext) -> StageResult:
    r, env = ctx.recipe, ctx.env
    cfg, m, k = r.retrieval, r.model.chunk_length, r.model.num_neighbors
    c = neighbors.num_candidates(cfg.num_candidates, k, cfg.k_query)
    w = ctx.workdir
    tok = workdir_tokenizer(w)
    train = ts.TokenStream(w / ts.CORPUS_DIR, "train")
    extras, removed = _sources(ctx, tok, train)

    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # ranks sharing this machine's cores
    threads = faiss_index.set_threads(local)
    embedder = BertEmbedder(cfg.embedder.path, cfg.embedder.max_tokens, cfg.embedder.batch_size, threads=threads)
    ctx.log(f"{threads} CPU thread(s) per rank for faiss" + (" and BERT" if embedder.device.type == "cpu" else
                                                             f"; BERT on {embedder.device}"))
    embedder_id = (cfg.embedder.path, cfg.embedder.max_tokens, embedder.dim)
    old_meta = files.read_json(w / NEIGHBORS_META) if (w / NEIGHBORS_META).is_file() else None
    splits = db_neighbors.Splits(ctx, tok, embedder_id, c, old_meta)
    keep_train = splits.keeps_train()

    # 1. chunk database: train documents, then extra corpora; ids stay put while kept neighbours use them
    chunks_file = w / chunk_db.CHUNKS_FILE
    previous = chunk_db.load(chunks_file) if chunks_file.is_file() else None
    parts = db_sources.plan_parts(previous, train, extras, removed, m, keep_train)
    if env.is_main:
        for name, stream in extras.items():
            db_sources.blank(ctx, name, stream, removed.get(name, np.zeros(0, np.int64)), tok.pad_id)
        chunk_db.build(parts, m, chunks_file)
        db_sources.drop_unused(w, parts, {db_sources.source_key(s, tok) for s in cfg.remove_sources})
    dist.barrier()
    db = chunk_db.load(chunks_file)
    tokens = database_tokens(w, db)
    n, n_train, live_n = len(db), int(db.part_chunks[1]), db.live_chunks
    ctx.log(f"{live_n} database chunks of up to {m} tokens, from train" + (f" and {len(extras)} extra corpora" if extras else "")
            + (f"; {db.removed_docs} document(s) taken out" if db.removed_docs else ""))
    string = cfg.index.string
    if string == "auto":
        string = faiss_index.auto_string(live_n, embedder.dim, cfg.index.memory_gb)
        ctx.log(f"index.string auto -> {string}")
        if old_meta and old_meta["index"] != string:
            ctx.log(f"the database now has {live_n} chunks, for which auto picks {string} instead of "
                    f"{old_meta['index']}: that index is trained anew")
    else:
        faiss_index.check_fits(string, min(n_train, cfg.index.ntrain or n_train))

    # 2. embeddings of database chunks, block by block (none for retired parts)
    retired = [i for i, name in enumerate(db.parts) if name.startswith(db_sources.RETIRED)]
    spans = [sp for sp in blocks.ranges(n, cfg.block_size, boundaries=db.part_chunks[1:-1])
             if db.part_of(sp[0]) not in retired]
    emb_dir = w / EMBEDDINGS_DIR

    def texts_of(rows) -> list[str]:  # rows: a slice or an array of chunk ids
        return [chunk_text(tok, tokens[s:e]) for s, e in zip(db.chunk_start[rows], db.chunk_end[rows])]

    def live(start: int, end: int) -> np.ndarray:
        return np.asarray(db.chunk_doc[start:end]) >= 0

    def block_key(start: int, end: int, whole: bool = False) -> str:
        """Content key of a block's chunks; whole: as if no document of it were taken out."""
        p = db.part_of(start)
        base = int(db.part_tokens[p])
        starts, ends = np.asarray(db.chunk_start[start:end]), np.asarray(db.chunk_end[start:end])
        if whole:
            ends = db.whole_ends(starts, ends)
        return chunk_block_key(embedder_id, tokens.streams[p], starts - base, ends - base)

    emb_keys = _gathered_keys(spans, block_key, env)
    gone_spans = [sp for sp in spans if db.empty_in(*sp)]
    whole_keys = _gathered_keys(gone_spans, lambda s, e: block_key(s, e, whole=True), env)
    progress = ctx.progress("embed", live_n, "chunks")

    def skipped(start: int, end: int, state: str) -> None:
        if state == "reused":
            progress.update((end - start) * env.world_size)

    def embed(texts: list[str]) -> np.ndarray:
        return embedder.embed(texts, lambda b: progress.update(b * env.world_size))

    def embed_rows(rows: np.ndarray, fn) -> np.ndarray:
        """Vectors of chunks `rows` by fn(texts); zero for chunks taken out."""
        keep = np.asarray(db.chunk_doc[rows]) >= 0
        if keep.all():
            return fn(texts_of(rows))
        out = np.zeros((len(rows), embedder.dim), dtype=np.float32)
        if keep.any():
            out[keep] = fn(texts_of(rows[keep]))
        return out

    def embed_block(start: int, end: int) -> np.ndarray:
        """A block's vectors; where chunks of it were taken out, the block stored before that
        (under its whole key) has the vectors of the others."""
        old = blocks.read(blocks.path(emb_dir, start, end, n), end - start, whole_keys[start]) \
            if start in whole_keys else None
        if old is None:
            return embed_rows(np.arange(start, end), embed)
        old[~live(start, end)] = 0.0
        progress.update((end - start) * env.world_size)
        return old

    counts = {"computed": 0, "rebuilt": 0}
    if cfg.keep_embeddings:
        counts = blocks.compute_missing(emb_dir, n, spans, embed_block, lambda s, e: emb_keys[s], env.rank,
                                        env.world_size, on_block=skipped)
        timings = {"embed_s": round(progress.close(), 3)}
        if counts["rebuilt"]:
            print(f"[build_db] rank {env.rank}: {counts['rebuilt']} damaged or stale embedding block(s) rebuilt", flush=True)
        dist.barrier()
        if env.is_main:
            blocks.remove(blocks.stale_files(emb_dir, n, spans))

    # 3. index: trained on train chunks only (an update never retrains it), then filled with live chunks
    sample = faiss_index.training_sample(n_train, cfg.index.ntrain, cfg.seed)
    live_sample = sample[np.asarray(db.chunk_doc[sample]) >= 0] if db.empty_chunks else sample
    train_spans = [sp for sp in spans if sp[1] <= n_train]
    plan = index_build.IndexPlan(string, embedder.dim, n, spans, emb_keys, "",
                                 w / "index" / faiss_index.folder_name(string), live)
    t_index = time.monotonic()
    if cfg.keep_embeddings:
        plan.train_key = _sha(string, sample, [whole_keys.get(s, emb_keys[s]) for s, _ in train_spans])

        def training_vectors() -> np.ndarray:
            vectors = np.empty((len(live_sample), embedder.dim), dtype=np.float32)
            for start, end, data in blocks.iter_blocks(emb_dir, n, train_spans, lambda s, e: emb_keys[s]):
                lo, hi = np.searchsorted(live_sample, [start, end])
                vectors[lo:hi] = data[live_sample[lo:hi] - start]
            return vectors

        index_build.build(ctx, plan, training_vectors,
                          lambda s, e: blocks.read(blocks.path(emb_dir, s, e, n), e - s, emb_keys[s]))
    else:  # only the training sample's embeddings are stored; every block is embedded as it is encoded
        sample_dir, sample_spans = w / SAMPLE_EMBEDDINGS_DIR, blocks.ranges(len(sample), cfg.block_size)

        def sample_key(s: int, e: int) -> str:  # the train stream's tokens, as if nothing were taken out
            starts = np.asarray(db.chunk_start[sample[s:e]])
            return chunk_block_key(embedder_id, train.tokens, starts,
                                   db.whole_ends(starts, np.asarray(db.chunk_end[sample[s:e]])))

        sample_keys = _gathered_keys(sample_spans, sample_key, env)
        plan.train_key = _sha("sample", string, sample, [sample_keys[s] for s, _ in sample_spans])

        def embed_sample() -> None:
            ctx.log(f"embedding the {len(live_sample)} chunks the index is trained on")
            blocks.compute_missing(sample_dir, len(sample), sample_spans, lambda s, e: embed_rows(sample[s:e], embedder.embed),
                                   lambda s, e: sample_keys[s], env.rank, env.world_size)
            dist.barrier()

        def training_sample() -> np.ndarray:
            vectors = np.concatenate([d for *_, d in blocks.iter_blocks(sample_dir, len(sample), sample_spans,
                                                                          lambda s, e: sample_keys[s])])
            return vectors[np.asarray(db.chunk_doc[sample]) >= 0] if db.empty_chunks else vectors

        index_build.build(ctx, plan, training_sample, lambda s, e: embed_rows(np.arange(s, e), embed),
                          before_training=embed_sample)
        timings = {"embed_s": round(progress.close(), 3)}
        if env.is_main:  # what an earlier run with keep_embeddings kept
            shutil.rmtree(w / EMBEDDINGS_DIR, ignore_errors=True)
            shutil.rmtree(w / QUERY_EMBEDDINGS_DIR, ignore_errors=True)
    dist.barrier()
    timings["index_s"] = round(time.monotonic() - t_index, 3)

    # 4. neighbours of every query chunk of every split (the train split's kept once trained on)
    summary: dict = {"db_chunks": live_n, "index": string, "timings": timings,
                     "embedding_blocks_computed": counts["computed"] + counts["rebuilt"]}
    if db.removed_docs:
        summary["removed_docs"] = db.removed_docs
    version = dist.broadcast_object(db_version.record(w, plan.fill_key, db)["version"] if env.is_main else None)
    summary["database_version"] = version
    splits_meta = splits.search(db, plan, embedder.embed, summary, version, keep_train)
    if cfg.validate_fraction > 0 and env.is_main:
        summary.update(_validate(spans, cfg.validate_fraction, cfg.seed, emb_dir, n, emb_keys,
                                 lambda s, e: embed_rows(np.arange(s, e), embedder.embed), ctx))
    if env.is_main:
        files.write_json(w / NEIGHBORS_META, {
            "chunk_length": m, "num_neighbors": k, "num_candidates": c, "k_query": cfg.k_query, "index": string,
            "db_chunks": n, "tokenizer_sha256": train.meta["tokenizer_sha256"], "block_size": cfg.block_size,
            "splits": splits_meta,
        })
    dist.barrier()
    outputs = [chunk_db.CHUNKS_FILE, f"index/{faiss_index.folder_name(string)}/added.faissindex", NEIGHBORS_META,
               db_version.VERSION_FILE]
    return StageResult(outputs=outputs, summary=summary, kept_trained=summary["train_neighbors"] == "kept")


def check_sources(ctx: StageContext) -> None:
    """Every removal names documents of the database (before the stage's manifest goes)."""
    w = ctx.workdir
    if ctx.recipe.retrieval.remove_sources and (w / ts.CORPUS_DIR / "meta.json").is_file():
        _sources(ctx, workdir_tokenizer(w), ts.TokenStream(w / ts.CORPUS_DIR, "train"))


def _sources(ctx: StageContext, tok, train) -> tuple[dict, dict]:
    """The extra corpora's streams by part name, and the documents taken out of each part.
    Every removal is matched before anything of the database is written."""
    extras = db_sources.extra_streams(ctx, tok)
    removals, written = db_sources.removal_digests(ctx, tok)
    try:
        removed = db_sources.match({"train": train, **extras}, removals) if removals else {}
    except UserError:
        if ctx.env.is_main:
            for record in written:
                record.unlink(missing_ok=True)
        raise
    redo = dist.broadcast_object([name for name, st in extras.items()
                                  if db_sources.unwanted_blanks(st, removed.get(name, np.zeros(0, np.int64)))])
    if redo:  # a document blanked earlier is wanted back: tokenize its corpus again
        if ctx.env.is_main:
            for name in redo:
                shutil.rmtree(ctx.workdir / db_sources.EXTRA_DIR / name.removeprefix("extra:"))
        dist.barrier()
        extras = db_sources.extra_streams(ctx, tok)
        removed = db_sources.match({"train": train, **extras}, removals) if removals else {}
    return extras, removed


def _gathered_keys(spans: list[tuple[int, int]], key, env) -> dict[int, str]:
    """Every block's key by its first row: each rank hashes its own blocks (round-robin)."""
    mine = {s: key(s, e) for i, (s, e) in enumerate(spans) if i % env.world_size == env.rank}
    return {s: k for part in dist.all_gather_object(mine) for s, k in part.items()}


def _validate(spans, fraction, seed, emb_dir, n, emb_keys, recompute, ctx) -> dict:
    """Recompute a random fraction of finished embedding blocks; compare bit for bit."""
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(spans), size=max(1, round(fraction * len(spans))), replace=False))
    bad = []
    for i in pick:
        s, e = spans[i]
        stored = blocks.read(blocks.path(emb_dir, s, e, n), e - s, emb_keys[s])
        if stored is None or not np.array_equal(stored, recompute(s, e)):
            bad.append(f"{s}-{e}")
    ctx.log(f"validated {len(pick)} embedding block(s): "
            + ("all identical" if not bad else f"{len(bad)} MISMATCH: {', '.join(bad)}"))
    return {"validated_blocks": len(pick), "validation_mismatches": len(bad)}


def database_tokens(workdir: Path, db: chunk_db.ChunkDB) -> chunk_db.PartTokens:
    """The database's tokens by global position: the train stream, then each extra corpus."""
    return chunk_db.PartTokens([db_sources.part_stream(workdir, name) for name in db.parts], db.part_tokens)
