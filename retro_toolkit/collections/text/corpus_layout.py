"""Where every unit of the corpus goes, computed from per-shard counts that ranks gather.

Each rank counts the non-empty documents and the units (documents, or passages) of its own
shards; with everyone's counts, every rank knows each shard's first unit number (the global
numbering `splits.Splitter` deals to train/valid/test) and, for a source with `max_docs`,
where reading stops: the shard holding the source's max_docs-th document is read up to it,
later shards not at all. This reproduces `iter_documents`'s order and cut exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np

from retro_toolkit.collections.text import shards
from retro_toolkit.collections.text.decoding import ReadStats
from retro_toolkit.collections.text.sources import Document, check_source, is_empty
from retro_toolkit.collections.text.splits import cut_passages


@dataclass
class ShardCount:
    docs: int  # non-empty documents
    units: int  # what the split deals: documents, or passages


def documents(shard: shards.Shard, src: Any, policy: str, stats: ReadStats, stop_after: Optional[int] = None,
              eod_id: Optional[int] = None) -> Iterator[tuple[Document, str]]:
    """(document, origin) of the shard's non-empty documents (empty ones, token ids that are only
    `eod_id` included, are counted in stats); with stop_after, reading stops right after that many."""
    docs = 0
    if stop_after is not None and stop_after <= 0:
        return
    for doc, origin in shards.read(shard, src, policy, stats):
        if is_empty(doc, eod_id):
            stats.empty_skipped += 1
            continue
        docs += 1
        yield doc, origin
        if stop_after is not None and docs >= stop_after:
            return


def units(shard: shards.Shard, src: Any, policy: str, passage_chars: Optional[int], stats: ReadStats,
          stop_after: Optional[int] = None, eod_id: Optional[int] = None) -> Iterator[Document]:
    """What the split deals from the shard: its documents, or their passages."""
    for doc, _ in documents(shard, src, policy, stats, stop_after, eod_id):
        if passage_chars is None:
            yield doc
        else:
            yield from cut_passages(doc, passage_chars)


def count(shard: shards.Shard, src: Any, policy: str, passage_chars: Optional[int],
          stop_after: Optional[int] = None, eod_id: Optional[int] = None) -> ShardCount:
    if shard.kind == "megatron" and passage_chars is None and stop_after is None:
        from pathlib import Path

        from retro_toolkit.collections.text.megatron_indexed import IndexedDataset, prefix_of

        ds = IndexedDataset(prefix_of(Path(shard.path)), shard.key)
        bounds = np.asarray(ds.doc_bounds[shard.lo:shard.hi + 1], dtype=np.int64)
        if len(bounds) < 2:
            return ShardCount(0, 0)
        tokens = np.concatenate([[0], np.cumsum(ds.lengths[bounds[0]:bounds[-1]], dtype=np.int64)])
        doc_tokens = tokens[bounds[1:] - bounds[0]] - tokens[bounds[:-1] - bounds[0]]
        n = int(np.count_nonzero(doc_tokens))
        if eod_id is not None:  # one-token documents that are only an end-of-document are empty
            first_seq = bounds[:-1][doc_tokens == 1]
            n -= int(np.count_nonzero(ds.tokens[ds.pointers[first_seq] // ds.dtype.itemsize] == eod_id))
        return ShardCount(n, n)
    docs = n = 0
    for doc, _ in documents(shard, src, policy, ReadStats(), stop_after, eod_id):
        docs += 1
        n += 1 if passage_chars is None else len(cut_passages(doc, passage_chars))
    return ShardCount(docs, n)


def iter_documents(sources: Any, on_invalid_utf8: str, stats: ReadStats | None = None,
                   key_prefix: str = "data.sources") -> Iterator[tuple[Document, str]]:
    """(text or token ids, origin) of every non-empty document of every source, in recipe order,
    each source cut at its max_docs, read in one process (what the shards of a corpus hold, put
    together); stats.per_source counts each source's documents."""
    stats = stats if stats is not None else ReadStats()
    for i, src in enumerate(sources):
        key = f"{key_prefix}[{i}]"
        check_source(src, key)
        n = 0
        for shard in shards.plan([src], keys=[key]):
            left = None if src.max_docs is None else src.max_docs - n
            for doc in documents(shard, src, on_invalid_utf8, stats, left):
                yield doc
                n += 1
        stats.per_source.append(n)


@dataclass
class Layout:
    stop_after: list[Optional[int]]  # per shard: None (read it all), 0 (skip it) or a document count
    first_unit: list[int]  # per shard: the global number of its first unit
    per_source: list[int]  # units of each source


def layout(plan: list[shards.Shard], counts: list[ShardCount], sources: Any, policy: str,
           passage_chars: Optional[int], eod_id: Optional[int] = None) -> Layout:
    stop_after: list[Optional[int]] = []
    shard_units: list[int] = []
    read_docs = [0] * len(sources)
    for shard, c in zip(plan, counts):
        limit = sources[shard.source].max_docs
        left = None if limit is None else limit - read_docs[shard.source]
        if left is not None and left <= 0:
            stop_after.append(0)
            shard_units.append(0)
        elif left is not None and c.docs >= left:  # the source's last document is in this shard
            stop_after.append(left)
            shard_units.append(left if passage_chars is None else
                               count(shard, sources[shard.source], policy, passage_chars, left, eod_id).units)
            read_docs[shard.source] += left
        else:
            stop_after.append(None)
            shard_units.append(c.units)
            read_docs[shard.source] += c.docs
    first, at, per_source = [], 0, [0] * len(sources)
    for shard, n in zip(plan, shard_units):
        first.append(at)
        at += n
        per_source[shard.source] += n
    return Layout(stop_after, first, per_source)
