"""Stage `prepare_corpus`: tokenize the sources into train/valid/test token streams.

Documents (or, with `data.split_by: passage`, their passages) are numbered in source
order, empty ones skipped; `splits.Splitter` sends each to a split, source by source, so
every split holds every source (meta.json counts each source's units per split, for
blends). Under torchrun each rank tokenizes one contiguous range of units into part
files and rank 0 concatenates the parts in rank order, so the output is byte-identical
for any number of processes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from retro_toolkit.collections.text import token_stream as ts
from retro_toolkit.collections.text.decoding import ReadStats
from retro_toolkit.collections.text.sources import iter_documents
from retro_toolkit.collections.text.splits import Splitter
from retro_toolkit.collections.text.tokenizer import workdir_tokenizer
from retro_toolkit.core import dist, files
from retro_toolkit.core.stage import StageContext, StageResult
from retro_toolkit.errors import UserError


def _part(corpus: Path, split: str, rank: int) -> tuple[Path, Path]:
    parts = corpus / ".parts"
    return parts / f"{split}-rank{rank:05d}.bin", parts / f"{split}-rank{rank:05d}.len.npy"


def run(ctx: StageContext) -> StageResult:
    data = ctx.recipe.data
    corpus = ctx.workdir / ts.CORPUS_DIR
    tok = workdir_tokenizer(ctx.workdir)
    dtype = ts.dtype_for_vocab(tok.vocab_size)

    passage_chars = data.passage_chars if data.split_by == "passage" else None

    def units(stats: ReadStats):
        return iter_documents(data.sources, data.on_invalid_utf8, stats, passage_chars=passage_chars)

    stats = ReadStats()
    num_docs = sum(1 for _ in units(stats))
    splitter = Splitter(list(stats.per_source), list(data.split), data.split_by)
    counts = {split: splitter.source_counts(s) for s, split in enumerate(ts.SPLITS)}
    unit = "passages" if passage_chars else "documents"
    for s, split in enumerate(ts.SPLITS):
        if data.split[s] > 0 and sum(counts[split]) == 0:
            raise UserError(
                f"the corpus has {num_docs} {unit}, too few for data.split = {list(data.split)}: "
                f"split '{split}' would be empty. Add documents or change data.split"
                + (" or lower data.passage_chars." if passage_chars else ".")
            )
    ctx.log(
        f"{num_docs} {unit} ({stats.empty_skipped} empty documents skipped); "
        + ", ".join(f"{split} {sum(counts[split])}" for split in ts.SPLITS)
    )

    first, last = dist.shard_range(num_docs, ctx.env.rank, ctx.env.world_size)
    (corpus / ".parts").mkdir(parents=True, exist_ok=True)
    progress = ctx.progress("tokenize", last - first, "docs")
    outs = {s: (open(_part(corpus, s, ctx.env.rank)[0], "wb"), []) for s in ts.SPLITS}
    batch: list[tuple[int, str]] = []

    def flush() -> None:
        ids = tok.encode([t for _, t in batch])
        for (i, _), doc in zip(batch, ids):
            split = ts.SPLITS[splitter(i)]
            arr = np.asarray(doc + [tok.eod_id], dtype=dtype)
            f, lengths = outs[split]
            f.write(arr.tobytes())
            lengths.append(len(arr))
            progress.update(1, tokens=len(arr))
        batch.clear()

    for i, (text, _) in enumerate(units(ReadStats())):
        if i >= last:
            break
        if i >= first:
            batch.append((i, text))
            if len(batch) >= data.tokenize_batch_docs:
                flush()
    if batch:
        flush()
    for split, (f, lengths) in outs.items():
        f.close()
        np.save(_part(corpus, split, ctx.env.rank)[1], np.asarray(lengths, dtype=np.int64))
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
            lengths = [np.load(_part(corpus, split, r)[1]) for r in range(ctx.env.world_size)]
            offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int64)
            with files.atomic_path(ts.bin_path(corpus, split)) as tmp, open(tmp, "wb") as out:
                for r in range(ctx.env.world_size):
                    with open(_part(corpus, split, r)[0], "rb") as part:
                        shutil.copyfileobj(part, out, 1 << 22)
            with files.atomic_path(ts.idx_path(corpus, split)) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, offsets)
            meta["splits"][split] = {"documents": len(offsets) - 1, "tokens": int(offsets[-1]),
                                     "source_documents": counts[split]}
            summary[f"{split}_tokens"] = int(offsets[-1])
        files.write_json(corpus / "meta.json", meta)
        shutil.rmtree(corpus / ".parts")
        ctx.log("tokens: " + ", ".join(f"{s} {meta['splits'][s]['tokens']}" for s in ts.SPLITS))
    dist.barrier()
    outputs = [f"{ts.CORPUS_DIR}/meta.json"]
    outputs += [f"{ts.CORPUS_DIR}/{s}{ext}" for s in ts.SPLITS for ext in (".bin", ".idx.npy")]
    return StageResult(outputs=outputs, summary=summary)
