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
from array import array
from pathlib import Path

import numpy as np

from retro_toolkit.collections.text import corpus_layout, shards
from retro_toolkit.collections.text import token_stream as ts
from retro_toolkit.collections.text.decoding import ReadStats
from retro_toolkit.collections.text.sources import check_source, check_token_sources, encode_documents
from retro_toolkit.collections.text.splits import Splitter
from retro_toolkit.collections.text.tokenizer import workdir_tokenizer
from retro_toolkit.core import dist, files
from retro_toolkit.core.stage import StageContext, StageResult
from retro_toolkit.errors import UserError


def _part(corpus: Path, split: str, shard: int) -> tuple[Path, Path]:
    parts = corpus / ".parts"
    return parts / f"{split}-shard{shard:07d}.bin", parts / f"{split}-shard{shard:07d}.len.npy"


def _merge(corpus: Path, split: str, written: list[int]) -> tuple[int, int]:
    """Concatenate the shards' parts of a split in shard order; the offsets are filled one
    shard at a time into a mapped .npy (as np.save writes it), never held whole."""
    docs = sum(len(np.load(_part(corpus, split, k)[1], mmap_mode="r")) for k in written)
    with files.atomic_path(ts.bin_path(corpus, split)) as tmp, open(tmp, "wb") as out:
        for k in written:
            with open(_part(corpus, split, k)[0], "rb") as part:
                shutil.copyfileobj(part, out, 1 << 22)
    with files.atomic_path(ts.idx_path(corpus, split)) as tmp:
        offsets = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(docs + 1,))
        offsets[0], at, total = 0, 1, 0
        for k in written:
            lengths = np.load(_part(corpus, split, k)[1])
            offsets[at:at + len(lengths)] = total + np.cumsum(lengths)
            at += len(lengths)
            total += int(lengths.sum())
        offsets.flush()
        del offsets
    return docs, total


def run(ctx: StageContext) -> StageResult:
    data, env = ctx.recipe.data, ctx.env
    corpus = ctx.workdir / ts.CORPUS_DIR
    tok = workdir_tokenizer(ctx.workdir)
    for i, src in enumerate(data.sources):
        check_source(src, f"data.sources[{i}]")
    check_token_sources(data.sources, tok)
    dtype = ts.dtype_for_vocab(tok.vocab_size)
    passage_chars = data.passage_chars if data.split_by == "passage" else None
    policy = data.on_invalid_utf8

    plan = shards.plan(data.sources, data.shard_mb)
    mine = [k for k in range(len(plan)) if k % env.world_size == env.rank]
    counted = {k: corpus_layout.count(plan[k], data.sources[plan[k].source], policy, passage_chars) for k in mine}
    gathered = {k: c for part in dist.all_gather_object(counted) for k, c in part.items()}
    lay = corpus_layout.layout(plan, [gathered[k] for k in range(len(plan))], data.sources, policy, passage_chars)
    num_docs = sum(lay.per_source)
    splitter = Splitter(lay.per_source, list(data.split), data.split_by)
    counts = {split: splitter.source_counts(s) for s, split in enumerate(ts.SPLITS)}
    unit = "passages" if passage_chars else "documents"
    for s, split in enumerate(ts.SPLITS):
        if data.split[s] > 0 and sum(counts[split]) == 0:
            raise UserError(
                f"the corpus has {num_docs} {unit}, too few for data.split = {list(data.split)}: "
                f"split '{split}' would be empty. Add documents or change data.split"
                + (" or lower data.passage_chars." if passage_chars else ".")
            )
    ctx.log(f"{num_docs} {unit} in {len(plan)} read shards; " + ", ".join(f"{split} {sum(counts[split])}"
                                                                         for split in ts.SPLITS))

    (corpus / ".parts").mkdir(parents=True, exist_ok=True)
    progress = ctx.progress("tokenize", sum(gathered[k].units for k in mine), unit)
    stats = ReadStats()
    for k in mine:
        if lay.stop_after[k] == 0:
            continue
        outs = {s: (open(_part(corpus, s, k)[0], "wb"), array("q")) for s in ts.SPLITS}
        batch: list = []

        def flush() -> None:
            for (i, _), doc in zip(batch, encode_documents(tok, [t for _, t in batch])):
                arr = np.asarray(doc + [tok.eod_id], dtype=dtype)
                f, lengths = outs[ts.SPLITS[splitter(i)]]
                f.write(arr.tobytes())
                lengths.append(len(arr))
                progress.update(1, tokens=len(arr))
            batch.clear()

        shard_units = corpus_layout.units(plan[k], data.sources[plan[k].source], policy, passage_chars, stats,
                                          lay.stop_after[k])
        for j, text in enumerate(shard_units):
            batch.append((lay.first_unit[k] + j, text))
            if len(batch) >= data.tokenize_batch_docs:
                flush()
        flush()
        for split, (f, lengths) in outs.items():
            f.close()
            np.save(_part(corpus, split, k)[1], np.asarray(lengths, dtype=np.int64))
    progress.close()
    totals = dist.all_gather_object((stats.empty_skipped, stats.invalid_utf8_replaced))
    stats.empty_skipped, stats.invalid_utf8_replaced = (sum(t[0] for t in totals), sum(t[1] for t in totals))
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
        written = [k for k in range(len(plan)) if lay.stop_after[k] != 0]
        for split in ts.SPLITS:
            docs, tokens = _merge(corpus, split, written)
            meta["splits"][split] = {"documents": docs, "tokens": tokens, "source_documents": counts[split]}
            summary[f"{split}_tokens"] = tokens
        files.write_json(corpus / "meta.json", meta)
        shutil.rmtree(corpus / ".parts")
        ctx.log("tokens: " + ", ".join(f"{s} {meta['splits'][s]['tokens']}" for s in ts.SPLITS))
    dist.barrier()
    outputs = [f"{ts.CORPUS_DIR}/meta.json"]
    outputs += [f"{ts.CORPUS_DIR}/{s}{ext}" for s in ts.SPLITS for ext in (".bin", ".idx.npy")]
    return StageResult(outputs=outputs, summary=summary)
