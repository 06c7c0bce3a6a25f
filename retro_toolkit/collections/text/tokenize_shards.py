"""Sources tokenized by every rank into token streams: the work of prepare_corpus and of
build_db's extra corpora.

Each rank counts its read shards (`shards.py`, round-robin), the counts are gathered so every
rank numbers the units the same way (`corpus_layout.py`), each rank tokenizes its shards into
one part file per shard and stream, and rank 0 concatenates the parts in shard order: the
streams are byte-identical for any number of ranks and any shard size.
"""

from __future__ import annotations

import shutil
from array import array
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from retro_toolkit.collections.text import corpus_layout, shards
from retro_toolkit.collections.text import token_stream as ts
from retro_toolkit.collections.text.decoding import ReadStats
from retro_toolkit.collections.text.sources import encode_documents
from retro_toolkit.core import dist, files


class ShardedRead:
    """The shards of `sources`, counted by every rank together, and each shard's place."""

    def __init__(self, sources: Any, policy: str, passage_chars: Optional[int], shard_mb: int, env,
                 key_prefix: str = "data.sources", eod_id: Optional[int] = None) -> None:
        self.sources, self.policy, self.passage_chars, self.env = sources, policy, passage_chars, env
        self.eod_id = eod_id  # token-id documents that are only this are empty
        self.plan = shards.plan(sources, shard_mb, [f"{key_prefix}[{i}]" for i in range(len(sources))])
        self.mine = [k for k in range(len(self.plan)) if k % env.world_size == env.rank]
        self.counts = self._count()
        self.layout = corpus_layout.layout(self.plan, self.counts, sources, policy, passage_chars, eod_id)
        self.written = [k for k in range(len(self.plan)) if self.layout.stop_after[k] != 0]

    def _count(self) -> list[corpus_layout.ShardCount]:
        """Every shard's count, a round of world-size shards at a time (shard k on rank k mod N);
        a source's shards after the round that reached its max_docs are not read at all."""
        n, world = len(self.plan), self.env.world_size
        counts: list[corpus_layout.ShardCount] = []
        docs = [0] * len(self.sources)
        for first in range(0, n, world):
            k = first + self.env.rank
            mine = None
            if k < n:
                src = self.sources[self.plan[k].source]
                if src.max_docs is None or docs[self.plan[k].source] < src.max_docs:
                    mine = corpus_layout.count(self.plan[k], src, self.policy, self.passage_chars, eod_id=self.eod_id)
            wave = dist.all_gather_object(mine) if world > 1 else [mine]
            for j, c in enumerate(wave[:n - first]):
                c = c or corpus_layout.ShardCount(0, 0)  # past its source's max_docs: never read
                counts.append(c)
                docs[self.plan[first + j].source] += c.docs
        return counts

    def my_units(self) -> int:
        return sum(self.counts[k].units for k in self.mine)

    def tokenize(self, tok, dtype: np.dtype, out: Path, streams: tuple[str, ...], route: Callable[[int], str],
                 batch_docs: int, progress) -> ReadStats:
        """This rank's shards into out/.parts/<stream>-shardNNNNNNN.{bin,len.npy}; `route` sends a
        unit (by its global number) to a stream. Returns the read counts summed over ranks."""
        (out / ".parts").mkdir(parents=True, exist_ok=True)
        stats = ReadStats()
        for k in self.mine:
            if self.layout.stop_after[k] == 0:
                continue
            outs = {s: (open(part(out, s, k)[0], "wb"), array("q")) for s in streams}
            batch: list = []

            def flush() -> None:
                for (i, _), doc in zip(batch, encode_documents(tok, [t for _, t in batch])):
                    arr = np.asarray(doc + [tok.eod_id], dtype=dtype)
                    f, lengths = outs[route(i)]
                    f.write(arr.tobytes())
                    lengths.append(len(arr))
                    progress.update(1, tokens=len(arr))
                batch.clear()

            shard = self.plan[k]
            units = corpus_layout.units(shard, self.sources[shard.source], self.policy, self.passage_chars, stats,
                                        self.layout.stop_after[k], self.eod_id)
            for j, text in enumerate(units):
                batch.append((self.layout.first_unit[k] + j, text))
                if len(batch) >= batch_docs:
                    flush()
            flush()
            for stream, (f, lengths) in outs.items():
                f.close()
                np.save(part(out, stream, k)[1], np.asarray(lengths, dtype=np.int64))
        totals = dist.all_gather_object((stats.empty_skipped, stats.invalid_utf8_replaced))
        return ReadStats(sum(t[0] for t in totals), sum(t[1] for t in totals))

    def merge(self, out: Path, stream: str) -> dict[str, int]:
        """(rank 0) The parts of `stream` concatenated in shard order into out/<stream>.bin and
        .idx.npy; the offsets are filled one shard at a time into a mapped .npy (as np.save
        writes it), never held whole."""
        docs = sum(len(np.load(part(out, stream, k)[1], mmap_mode="r")) for k in self.written)
        with files.atomic_path(ts.bin_path(out, stream)) as tmp, open(tmp, "wb") as f:
            for k in self.written:
                with open(part(out, stream, k)[0], "rb") as p:
                    shutil.copyfileobj(p, f, 1 << 22)
        with files.atomic_path(ts.idx_path(out, stream)) as tmp:
            offsets = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(docs + 1,))
            offsets[0], at, total = 0, 1, 0
            for k in self.written:
                lengths = np.load(part(out, stream, k)[1])
                offsets[at:at + len(lengths)] = total + np.cumsum(lengths)
                at += len(lengths)
                total += int(lengths.sum())
            offsets.flush()
            del offsets
        return {"documents": docs, "tokens": total}


def part(out: Path, stream: str, shard: int) -> tuple[Path, Path]:
    return out / ".parts" / f"{stream}-shard{shard:07d}.bin", out / ".parts" / f"{stream}-shard{shard:07d}.len.npy"
