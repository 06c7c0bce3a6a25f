"""The corpus cut into read shards, so that ranks read disjoint parts of it.

A shard is a piece of one source that can be read on its own: a byte range of an
uncompressed .jsonl (cut at line starts), a whole compressed .jsonl or .txt file, a row
group range of a Parquet file, a record batch range of an Arrow file, a range of documents
of a Megatron indexed dataset, or a whole builtin source. Shards in plan order hold the
documents in exactly the order `corpus_layout.iter_documents` reads them, so work split by shard
and merged in shard order gives what one process gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from retro_toolkit.collections.text import formats
from retro_toolkit.collections.text.decoding import ReadStats
from retro_toolkit.errors import UserError

DEFAULT_SHARD_MB = 256


@dataclass(frozen=True)
class Shard:
    source: int
    kind: str  # jsonl, txt, parquet, arrow, megatron, builtin
    path: str
    lo: int = 0  # first byte (jsonl), row group (parquet), record batch (arrow), document (megatron)
    hi: int = -1  # one past the last; -1: to the end
    key: str = "data.sources[0]"  # the recipe key of its source, for messages


def _file_shards(i: int, p: Path, kind: str, shard_bytes: int, key: str) -> list[Shard]:
    if kind == "jsonl" and formats._suffix(p) == ".jsonl":
        size = p.stat().st_size
        return [Shard(i, kind, str(p), lo, min(lo + shard_bytes, size), key)
                for lo in range(0, max(size, 1), shard_bytes)]
    if kind == "parquet":
        pa = formats._pyarrow()
        try:
            meta = pa.parquet.ParquetFile(str(p)).metadata
        except (pa.ArrowInvalid, OSError) as e:
            raise UserError(f"{key}.path: {p} is not a readable Parquet file ({e}).") from None
        groups, at, out = meta.num_row_groups, 0, []
        while at < groups:  # row groups adding up to about shard_bytes
            end, size = at, 0
            while end < groups and (end == at or size < shard_bytes):
                size += meta.row_group(end).total_byte_size
                end += 1
            out.append(Shard(i, kind, str(p), at, end, key))
            at = end
        return out or [Shard(i, kind, str(p), 0, 0, key)]
    if kind == "megatron":
        from retro_toolkit.collections.text.megatron_indexed import IndexedDataset, prefix_of

        ds = IndexedDataset(prefix_of(p), key)
        per = max(1, int(len(ds) * shard_bytes / max(ds.tokens.nbytes, 1)))
        return [Shard(i, kind, str(p), lo, min(lo + per, len(ds)), key) for lo in range(0, max(len(ds), 1), per)]
    return [Shard(i, kind, str(p), key=key)]  # compressed .jsonl, .txt, .arrow: read whole


def plan(sources: Any, shard_mb: int = DEFAULT_SHARD_MB, keys: Optional[list[str]] = None) -> list[Shard]:
    """Every source's shards, in reading order; `keys`: each source's recipe key (default data.sources[i])."""
    shard_bytes = shard_mb << 20
    out: list[Shard] = []
    for i, src in enumerate(sources):
        key = keys[i] if keys else f"data.sources[{i}]"
        if src.path.startswith("builtin:"):
            out.append(Shard(i, "builtin", src.path, key=key))
            continue
        p = Path(src.path)
        kind = formats.kind_of(p)
        if kind == "hf_dataset":
            members = [(f, "arrow") for f in formats.hf_dataset_files(p, key)]
        elif kind == "folder":
            members = []
            for f, k in formats.folder_files(p):  # a datasets folder inside a folder is its .arrow files
                members += [(g, "arrow") for g in formats.hf_dataset_files(f, key)] if k == "hf_dataset" else [(f, k)]
        else:
            members = [(p, kind)]
        for f, k in members:
            out += _file_shards(i, f, k, shard_bytes, key)
    return out


def _jsonl_range(path: Path, lo: int, hi: int) -> Iterator[tuple[bytes, str]]:
    """(line, where) of the lines that start in [lo, hi)."""
    with open(path, "rb") as f:
        if lo > 0:
            f.seek(lo - 1)
            f.readline()  # the rest of the line that started before lo
        at, lineno = f.tell(), 0
        while at < hi:
            line = f.readline()
            if not line:
                return
            lineno += 1
            yield line, (f"{path}:{lineno}" if lo == 0 else f"{path} (the line at byte {at})")
            at += len(line)


def read(shard: Shard, src: Any, policy: str, stats: ReadStats) -> Iterator[tuple[Any, str]]:
    """(document, origin) of every document of the shard, empty ones included."""
    from retro_toolkit.collections.text import sources

    key = shard.key
    if shard.kind == "builtin":
        from retro_toolkit.collections.text.builtin_sources import builtin_documents

        yield from builtin_documents(shard.path, policy, stats)
        return
    p = Path(shard.path)
    if shard.kind == "jsonl" and shard.hi >= 0:
        yield from sources.jsonl_records(_jsonl_range(p, shard.lo, shard.hi), src.text_key, key, policy, stats)
    elif shard.kind == "parquet":
        if shard.lo >= shard.hi:
            return
        pa = formats._pyarrow()
        f = pa.parquet.ParquetFile(str(p))
        row = sum(f.metadata.row_group(g).num_rows for g in range(shard.lo))
        batches = f.iter_batches(batch_size=1024, row_groups=list(range(shard.lo, shard.hi)), columns=[src.text_key])
        yield from ((t or "", where) for t, where in formats.text_batches(batches, f.schema_arrow, p, src.text_key,
                                                                           key, row))
    elif shard.kind == "megatron":
        from retro_toolkit.collections.text.megatron_indexed import IndexedDataset, prefix_of

        ds = IndexedDataset(prefix_of(p), key)
        for d in range(shard.lo, shard.hi):
            yield ds.document(d), f"{ds.prefix}:doc{d}"
    else:
        yield from sources.file_documents(p, shard.kind, src.text_key, key, policy, stats)
