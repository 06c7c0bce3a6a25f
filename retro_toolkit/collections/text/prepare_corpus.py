"""Stage `prepare_corpus`: tokenize the sources into train/valid/test token streams.

Documents (or, with `data.split_by: passage`, their passages) are numbered in source
order, empty ones skipped; `splits.Splitter` sends each to a split, source by source, so
every split holds every source (meta.json counts each source's units per split, for
blends). The sources are cut into read shards (`shards.py`: byte ranges, row groups,
document ranges); under torchrun each rank counts, then tokenizes, only its own shards
(round-robin), writing one part file per shard and split, and rank 0 concatenates the parts
in shard order: every rank reads about 1/N of the corpus, and the output is byte-identical
for any number of processes.
"""

from __future__ import annotations

import shutil

from retro_toolkit.collections.text import token_stream as ts
from retro_toolkit.collections.text.sources import check_source, check_token_sources
from retro_toolkit.collections.text.splits import Splitter
from retro_toolkit.collections.text.tokenize_shards import ShardedRead
from retro_toolkit.collections.text.tokenizer import workdir_tokenizer
from retro_toolkit.core import dist, files
from retro_toolkit.core.stage import StageContext, StageResult
from retro_toolkit.errors import UserError


def run(ctx: StageContext) -> StageResult:
    data = ctx.recipe.data
    corpus = ctx.workdir / ts.CORPUS_DIR
    tok = workdir_tokenizer(ctx.workdir)
    for i, src in enumerate(data.sources):
        check_source(src, f"data.sources[{i}]")
    check_token_sources(data.sources, tok)
    dtype = ts.dtype_for_vocab(tok.vocab_size)
    passage_chars = data.passage_chars if data.split_by == "passage" else None

    read = ShardedRead(data.sources, data.on_invalid_utf8, passage_chars, data.shard_mb, ctx.env,
                       eod_id=tok.eod_id)
    num_docs = sum(read.layout.per_source)
    splitter = Splitter(read.layout.per_source, list(data.split), data.split_by)
    counts = {split: splitter.source_counts(s) for s, split in enumerate(ts.SPLITS)}
    unit = "passages" if passage_chars else "documents"
    for s, split in enumerate(ts.SPLITS):
        if data.split[s] > 0 and sum(counts[split]) == 0:
            raise UserError(
                f"the corpus has {num_docs} {unit}, too few for data.split = {list(data.split)}: "
                f"split '{split}' would be empty. Add documents or change data.split"
                + (" or lower data.passage_chars." if passage_chars else ".")
            )
    ctx.log(f"{num_docs} {unit} in {len(read.plan)} read shards; " + ", ".join(f"{split} {sum(counts[split])}"
                                                                              for split in ts.SPLITS))
    progress = ctx.progress("tokenize", read.my_units(), unit)
    stats = read.tokenize(tok, dtype, corpus, ts.SPLITS, lambda i: ts.SPLITS[splitter(i)], data.tokenize_batch_docs,
                          progress)
    progress.close()
    dist.barrier()

    summary: dict[str, int] = {"documents": num_docs, "empty_skipped": stats.empty_skipped}
    if ctx.env.is_main:
        meta: dict = {
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "special_ids": tok.special_ids(),
            "tokenizer_sha256": tok.sha256,
            "split_by": data.split_by,
            "empty_skipped": stats.empty_skipped,
            "invalid_utf8_replaced": stats.invalid_utf8_replaced,
            "splits": {},
        }
        for split in ts.SPLITS:
            merged = read.merge(corpus, split)
            meta["splits"][split] = {**merged, "source_documents": counts[split]}
            summary[f"{split}_tokens"] = merged["tokens"]
        files.write_json(corpus / "meta.json", meta)
        shutil.rmtree(corpus / ".parts")
        ctx.log("tokens: " + ", ".join(f"{s} {meta['splits'][s]['tokens']}" for s in ts.SPLITS))
    dist.barrier()
    outputs = [f"{ts.CORPUS_DIR}/meta.json"]
    outputs += [f"{ts.CORPUS_DIR}/{s}{ext}" for s in ts.SPLITS for ext in (".bin", ".idx.npy")]
    return StageResult(outputs=outputs, summary=summary)
