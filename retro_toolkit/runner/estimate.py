"""What a recipe will need before it is queued: disk for each stage's outputs, memory per rank
of build_db and pretrain (`retro-run validate RECIPE --estimate`).

Sizes come from what can be read without running anything: a prepared corpus's exact token
counts when the work directory has one; else each source's size (a Megatron dataset's tokens
exactly, Parquet's uncompressed text bytes, other files' bytes, a compressed file's bytes
times COMPRESSION) at BYTES_PER_TOKEN bytes of text per token. The model's parameters are
counted on the meta device. Every figure is an estimate and says how it was made.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BYTES_PER_TOKEN = 4.0  # English text under a 32K-256K vocabulary
COMPRESSION = 3.5  # text bytes per compressed byte (.gz, .zst)
MEAN_DOC_TOKENS = 600


@dataclass
class Row:
    stage: str
    what: str
    bytes: float
    how: str


def corpus_tokens(recipe) -> tuple[int, str]:
    """(tokens of the whole corpus, how that was found)."""
    from retro_toolkit.collections.text import formats
    from retro_toolkit.collections.text.megatron_indexed import IndexedDataset, prefix_of

    meta = Path(recipe.workdir) / "corpus" / "meta.json"
    if meta.is_file():
        splits = json.loads(meta.read_text())["splits"]
        return sum(s["tokens"] for s in splits.values()), "the prepared corpus's token counts"
    total, how = 0.0, set()
    for src in recipe.data.sources:
        if src.path.startswith("builtin:"):
            from retro_toolkit.collections.text.builtin_sources import builtin_documents
            from retro_toolkit.collections.text.decoding import ReadStats

            total += sum(len(t) for t, _ in builtin_documents(src.path, "replace", ReadStats())) / BYTES_PER_TOKEN
            how.add("builtin text")
            continue
        p = Path(src.path)
        kind = formats.kind_of(p)
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
        if kind == "megatron":
            ds = IndexedDataset(prefix_of(p))
            total += ds.tokens.nbytes / ds.dtype.itemsize
            how.add("Megatron datasets' token counts")
            continue
        for f in files:
            size = f.stat().st_size
            if f.suffix == ".parquet":
                pq = formats._pyarrow().parquet.ParquetFile(str(f)).metadata
                size = sum(pq.row_group(g).total_byte_size for g in range(pq.num_row_groups))
            elif f.suffix in (".gz", ".zst"):
                size *= COMPRESSION
            elif f.suffix not in (".jsonl", ".txt", ".arrow"):
                continue
            total += size / BYTES_PER_TOKEN
        how.add(f"file sizes at {BYTES_PER_TOKEN:g} bytes per token")
    if not recipe.data.sources:
        return 0, "no sources"
    return int(total), ", ".join(sorted(how))


def _pq(string: str) -> re.Match | None:
    """The PQ<M>[x<bits>] part of a factory string (never the OPQ<M> transform)."""
    return re.search(r"(?<!O)PQ(\d+)(?:x(\d+))?", string)


def code_bytes(string: str, dim: int) -> tuple[float, str]:
    """Bytes per vector a faiss index of this factory string holds (codes + ids)."""
    ids = 8 if "IVF" in string else 0
    if m := _pq(string):
        return int(m[1]) * int(m[2] or 8) / 8 + ids, f"{m[0]} codes + {ids}-byte ids"
    if "SQ8" in string:
        return dim + ids, "SQ8 codes"
    if "SQfp16" in string:
        return 2 * dim + ids, "fp16 codes"
    return 4 * dim + ids, "float32 vectors"


def rows(recipe) -> tuple[list[Row], list[Row], str]:
    """(disk rows, memory-per-rank rows, how the corpus was sized)."""
    tokens, how = corpus_tokens(recipe)
    split = list(recipe.data.split)
    m, k = recipe.model.chunk_length, recipe.model.num_neighbors
    train = tokens * split[0]
    chunks, query_chunks = train / m, tokens / m
    docs = tokens / MEAN_DOC_TOKENS
    vocab = recipe.model.vocab_size or recipe.tokenizer.vocab_size
    itemsize = 2 if vocab <= 65535 else 4
    disk = [Row("prepare_corpus", "token streams", tokens * itemsize + docs * 8,
                f"{tokens:,.0f} tokens x {itemsize} bytes + offsets")]
    stages = list(recipe.stages)
    mem: list[Row] = []
    if "build_db" in stages:
        r = recipe.retrieval
        dim = _embedder_dim(r.embedder.path)
        string = r.index.string
        if string == "auto":
            from retro_toolkit.collections.retrieval.index import auto_string

            string = auto_string(int(chunks), dim, r.index.memory_gb)
        per_vec, what = code_bytes(string, dim)
        from retro_toolkit.collections.retrieval.neighbors import num_candidates

        c = num_candidates(r.num_candidates, k, r.k_query)
        disk += [Row("build_db", "chunk database", chunks * 24 + docs * 8, f"{chunks:,.0f} chunks x 3 int64"),
                 *([Row("build_db", "chunk embeddings", chunks * dim * 4, f"float32, dim {dim}"),
                    Row("build_db", "query embeddings", query_chunks * dim * 4, "every split's chunks")]
                   if r.keep_embeddings else
                   [Row("build_db", "training sample embeddings", min(chunks, r.index.ntrain or 10**6) * dim * 4,
                        f"float32, dim {dim}; retrieval.keep_embeddings is false")]),
                 Row("build_db", f"index {string}", chunks * per_vec, what),
                 Row("build_db", "neighbours", query_chunks * c * 8, f"{c} candidates x int64")]
        mem += _index_memory(string, dim, chunks * per_vec, what, r.index.memory_gb)
        mem += [Row("build_db", "a block of embeddings", r.block_size * dim * 4 * 2,
                    f"retrieval.block_size {r.block_size} x dim {dim}, twice")]
    for stage in ("pretrain", "sft"):
        if stage in stages:
            params, prow, drow = _training(recipe, stage)
            mem += prow
            disk.append(drow)
    return disk, mem, how


def _index_memory(string: str, dim: int, size: float, what: str, window_gb: float) -> list[Row]:
    """An IVF index's lists are memory-mapped (page cache that a node's ranks share, filled
    through a window); each rank holds its coarse quantizer. Other indexes are searched whole."""
    ivf = re.search(r"IVF(\d+)(?:_HNSW(\d+))?", string)
    if not ivf:
        return [Row("build_db", f"index {string} (every rank searches it whole)", size, what)]
    reduced = re.search(r"(?:OPQ\d+_|PCAR?)(\d+)", string)
    d, nlist, links = int(reduced[1]) if reduced else dim, int(ivf[1]), int(ivf[2] or 0)
    quantizer = nlist * d * 4 + nlist * 2 * links * 4
    rows = []
    if pq := _pq(string):  # faiss precomputes these up to 2 GiB, else not at all
        table = nlist * int(pq[1]) * 2 ** int(pq[2] or 8) * 4
        if table <= 2**31:
            rows.append(Row("build_db", "IVF-PQ search table (every rank, while searching)", table,
                            f"{nlist:,} lists x {pq[1]} sub-quantizers x {2 ** int(pq[2] or 8)} float32"))
    return [Row("build_db", f"index {string} lists (memory-mapped: page cache a node's ranks share)", size, what),
            Row("build_db", "index coarse quantizer (every rank)", quantizer,
                f"{nlist:,} centroids x {d} float32" + (f" + HNSW{links} links" if links else "")), *rows,
            Row("build_db", "index fill on rank 0 (page cache)", min(size, window_gb * 2**30),
                "a window of retrieval.index.memory_gb; the codes are read once per window")]


def _embedder_dim(path: str) -> int:
    from retro_toolkit.collections.retrieval.embedder import resolve_path

    cfg = Path(resolve_path(path)) / "config.json"
    return int(json.loads(cfg.read_text()).get("hidden_size", 1024)) if cfg.is_file() else 1024


def _training(recipe, stage: str) -> tuple[int, list[Row], Row]:
    from retro_toolkit.collections.retro.config import config_from_model_section
    from retro_toolkit.collections.retro.engine import model_section
    from retro_toolkit.collections.retro.model import parameter_counts
    from retro_toolkit.executors.common import for_stage

    section = model_section(recipe, recipe.model.arch) if recipe.model.vocab_size else \
        {**_plain(recipe.model), "arch": recipe.model.arch, "vocab_size": recipe.tokenizer.vocab_size}
    config, args = config_from_model_section(section)
    params = parameter_counts(config, args)["total"]
    p = recipe[stage]
    tp = int(section.get("tensor_model_parallel_size") or 1)
    ex = for_stage(recipe.executor, stage)
    world = int(ex.get("nodes", 1)) * int(ex.get("ntasks_per_node", ex.get("nproc_per_node", 1)))
    dp = max(1, world // tp)
    distributed = p.use_distributed_optimizer if p.use_distributed_optimizer is not None else dp > 1
    weights = (2 if p.bf16 else 4) + 4  # the weights, and fp32 main grads
    states = 8 + (4 if p.bf16 else 0)  # Adam's two moments, and fp32 main weights under bf16
    per_rank = params / tp * (weights + states / (dp if distributed else 1))
    s, b, h, layers = section["seq_length"], p.micro_batch_size, section["hidden_size"], section["num_layers"]
    heads = section["num_attention_heads"]
    act = s * b * h * layers * (34 + 5 * heads * s / h) / tp * (0.1 if p.recompute_activations else 1)
    how = (f"{params:,} parameters / TP {tp} x ({weights} + {states}{f' / DP {dp}' if distributed else ''}) bytes")
    rows = [Row(stage, "weights, grads, optimizer", per_rank, how),
            Row(stage, f"activations ({'bf16' if p.bf16 else 'fp32'}, one micro-batch)", act * (1 if p.bf16 else 2),
                "s*b*h*L*(34 + 5*a*s/h) / TP (Korthikanti et al. 2022), x0.1 with recompute")]
    return params, rows, Row(stage, "one checkpoint", params * (4 + 8 + (2 if p.bf16 else 0)),
                             "fp32 weights + Adam moments" + (" + bf16 weights" if p.bf16 else ""))


def _plain(node: Any) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n:,.0f} B"
        n /= 1024
    return f"{n:.1f}"


def report(recipe) -> str:
    disk, mem, how = rows(recipe)
    out = [f"estimates (corpus sized from {how}):", "  disk:"]
    out += [f"    {r.stage:<15} {human(r.bytes):>12}  {r.what} ({r.how})" for r in disk]
    out.append(f"    {'total':<15} {human(sum(r.bytes for r in disk)):>12}")
    out.append("  memory per rank:")
    out += [f"    {r.stage:<15} {human(r.bytes):>12}  {r.what} ({r.how})" for r in mem]
    return "\n".join(out)
