"""Memory and time as the corpus grows: does a rank's memory stay flat from 10^7 to 10^8 tokens?

    python benchmarks/scale.py                          # 1e7 and 1e8 tokens
    python benchmarks/scale.py --tokens 1e7 1e8 1e9     # where the disk allows (2 bytes a token, twice)
    python benchmarks/scale.py --chunk-db-docs 16000 160000 1600000 --out benchmarks/results/scale_chunk_db.json
                                                        # the chunk DB build alone, up to 10^9 tokens' documents

The corpus is synthetic but real text: documents are windows of CPython's pydoc topics,
tokenized once by a SentencePiece model trained on them, written as a Megatron indexed
dataset by megatron-core's own IndexedDatasetBuilder, and read back as a `data.sources`
entry (token ids, so no tokenizer time is measured). Each phase runs in a fresh process and
reports, over that process's own baseline after its imports, the peak RSS (the kernel's
VmHWM, reset first) and the peak RssAnon (sampled every 5 ms; file pages of a memory map count
in RSS and are reclaimable, anonymous memory is what a rank really holds):

  corpus       the prepare_corpus stage (run_stage in this process, one rank)
  chunk_db     chunk_db.build over the train split, then every chunk read once through load()
  chunk_db_in_memory   the same read with every column loaded whole (how load() used to work)
  neighbours   neighbour blocks (synthetic candidate ids, build_db's block files) read in
               training-sized row slices through map_neighbors()
  neighbours_in_memory the same with every block concatenated in memory (how load_neighbors works)

  index        faiss IVF<N/1024>_HNSW32,PQ16 (lists of about 1024 chunks at any size, an HNSW
               coarse quantizer as in the full-size recipes' IVF4194304_HNSW32) trained on 65,536
               synthetic 64-dim vectors, then every chunk's vector encoded a block at a time into code
               blocks and the index file written from them through a 16 MiB window
               (build_db's index step, collections/retrieval/ivf_fill.py)
  search       the saved index memory-mapped and searched with every chunk's vector, a block at
               a time (build_db's neighbour step; nprobe 8, k 20), without faiss's precomputed
               IVF-PQ table, as at full size: faiss builds it only below 2 GiB (lists x M x 256
               floats), and InstructRetro's 4,194,304 lists x PQ64 would need 256 GiB
  search_table the same search with that table (faiss's default at this size): it grows with the
               list count, 2.5 MiB at 10^7 tokens and 24 MiB at 10^8 here, until the 2 GiB cap

With --ranks 1 2, the corpus, index and search phases run again on 2 ranks (torchrun, gloo),
each rank doing its share of the shards or blocks as build_db does; the index phase reuses the
1-rank run's trained index (as build_db reuses one), so both write the same index file.

The embedder is bypassed: vectors are synthetic (seeded per block, clustered so IVF has
structure), generated where build_db would read its embedding blocks. Only a benchmark may do
this; the embedder's own throughput is measured by speed/build_db.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import PeakMemory, add_out, write_result  # noqa: E402

PHASES = ("corpus", "chunk_db", "chunk_db_in_memory", "neighbours", "neighbours_in_memory", "index", "search",
          "search_table")
RANKED = ("corpus", "index", "search")  # the phases also measured on 2 ranks
LIST_CHUNKS = 1024  # chunks per IVF list: searching a query costs the same at any corpus size
QUANTIZER = "HNSW32"  # the coarse quantizer of the full-size recipes: a query's cost grows as log(lists)
CODES = "PQ16"  # 16-byte codes of 64-dim vectors, as InstructRetro's PQ64 of 1024-dim ones at 1/4 scale
DIM = 64
TRAIN_VECTORS = 65_536  # at any size, as build_db samples retrieval.index.ntrain (up to 1M)
FILL_WINDOW = 16 << 20  # retrieval.index.memory_gb, scaled down: the index file is written 16 MiB at a time
# Rows per embedding block: 7 blocks at 10^7 tokens, so both sizes are measured once glibc's malloc has
# settled. Its peak rises over the first blocks of a process (after the first freed block it keeps up
# to twice that block's size in its heap) and is flat from about the fifth on: 8 blocks of 50,000
# queries peaked at 80 MiB in an index of 157 lists and at 81 MiB in one of 1524.
EMB_BLOCK = 25_000
SHARD_MB = 16  # read shards (data.shard_mb): 13 of them at 10^8 tokens, so 2 ranks share the corpus
MEAN_DOC_TOKENS = 600
NEIGHBOUR_COLUMNS = 20
ROWS_PER_SAMPLE = 32  # a 2048-token sample's query chunks
READ_ROWS = 1 << 16  # chunks read at a time (build_db reads retrieval.block_size rows)


def measured(fn) -> dict:
    """fn() with peak RSS / RssAnon increases over this process's baseline, and seconds."""
    with PeakMemory(0.005) as mem:
        start = time.perf_counter()
        extra = fn() or {}
        seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 3), "baseline_rss": mem.base["VmRSS"], "peak_rss_increase": mem.peak_rss_increase,
            "peak_rss_anon_increase": mem.peak_anon_increase, **extra}


def make_corpus(root: Path, tokens: int) -> Path:
    """root/w: a work directory whose tokenizer stage is done, its source a synthetic Megatron dataset."""
    import numpy as np
    import pydoc_data.topics
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from retro_toolkit.collections.text.sentencepiece_tokenizer import SentencePieceTokenizer, train_sentencepiece

    texts = list(pydoc_data.topics.topics.values())
    model = root / "tokenizer.model"
    if not model.is_file():
        train_sentencepiece(iter(texts), model, 4000, "unigram", 0.9995, 10**6, True, 1)
    tok = SentencePieceTokenizer(model)
    pool = np.concatenate([np.asarray(ids, dtype=np.uint16) for ids in tok.encode(texts)])
    rng = np.random.default_rng(0)
    prefix = root / "synthetic_text_document"
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    written = 0
    while written < tokens:
        n = int(min(rng.geometric(1 / MEAN_DOC_TOKENS) + 16, tokens - written + 1, len(pool) // 2))
        at = int(rng.integers(0, len(pool) - n))
        doc = np.append(pool[at:at + n - 1], np.uint16(tok.eod_id))
        builder.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
        written += len(doc)
    builder.finalize(f"{prefix}.idx")
    w = root / "w"
    p = subprocess.run([sys.executable, "-m", "retro_toolkit", "recipes/smoke.yaml", f"workdir={w}",
                        "stages=[tokenizer,prepare_corpus]", "--stages", "tokenizer", f"tokenizer.model={model}",
                        f"data.sources=[{{path: '{prefix}'}}]", "data.split=[0.98,0.01,0.01]",
                        f"data.shard_mb={SHARD_MB}"],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(p.stdout + p.stderr)
    return w


def write_neighbours(w: Path, rows: int, block: int) -> None:
    """Neighbour blocks as build_db writes them (keys, meta), holding synthetic candidate ids."""
    import numpy as np

    from retro_toolkit.collections.retrieval import blocks
    from retro_toolkit.collections.retrieval.neighbors import NEIGHBORS_DIR, NEIGHBORS_META
    from retro_toolkit.core import files

    spans = blocks.ranges(rows, block)
    rng = np.random.default_rng(1)
    for s, e in spans:
        blocks.write(blocks.path(w / NEIGHBORS_DIR / "train", s, e, rows),
                     rng.integers(0, rows, (e - s, NEIGHBOUR_COLUMNS), dtype=np.int64), key=f"{s}")
    files.write_json(w / NEIGHBORS_META, {"block_size": block, "num_candidates": NEIGHBOUR_COLUMNS, "splits": {
        "train": {"query_chunks": rows, "keys": [f"{s}" for s, _ in spans]}}})


def run_phase(phase: str, w: Path) -> dict:
    """One phase in this process (a fresh one: the parent starts a process per phase)."""
    import numpy as np

    from retro_toolkit.collections.retrieval import chunk_db
    from retro_toolkit.collections.retrieval.neighbors import load_neighbors, map_neighbors
    from retro_toolkit.collections.text import token_stream as ts
    from retro_toolkit.launch import run_stage

    from retro_toolkit.core import dist

    db_file = w / chunk_db.CHUNKS_FILE
    rank = int(os.environ.get("RANK", 0))
    if phase in RANKED:
        dist.init()  # under torchrun: the process group's own memory belongs to the baseline
        dist.barrier()
    if phase == "corpus":
        r = measured(lambda: {"rc": run_stage("prepare_corpus", str(w / "recipe.resolved.yaml"))})
        return {**r, "rank": rank, "corpus_sha256": _digest(sorted((w / ts.CORPUS_DIR).iterdir()))}
    if phase.startswith("chunk_db"):
        in_memory = phase.endswith("in_memory")
        if not in_memory:
            db_file.unlink(missing_ok=True)

        def chunks():
            if not in_memory:
                chunk_db.build([chunk_db.Part("train", ts.TokenStream(w / ts.CORPUS_DIR, "train").doc_offsets)], 64, db_file)
            db = chunk_db.load(db_file)
            if in_memory:
                db.chunk_doc, db.chunk_start, db.chunk_end = (np.array(db.chunk_doc), np.array(db.chunk_start),
                                                              np.array(db.chunk_end))
            total = 0
            for lo in range(0, len(db), READ_ROWS):  # every chunk read once, a block at a time as build_db does
                total += int((db.chunk_end[lo:lo + READ_ROWS] - db.chunk_start[lo:lo + READ_ROWS]).sum())
            return {"chunks": len(db), "tokens_in_chunks": total}

        return measured(chunks)
    rows = len(chunk_db.load(db_file))
    if phase in ("index", "search", "search_table"):
        added = w / "synthetic_index" / "added.faissindex"
        if phase == "index" and rank == 0:  # every run encodes and fills anew (a trained index is kept)
            shutil.rmtree(added.parent / "codes", ignore_errors=True)
            added.unlink(missing_ok=True)
        dist.barrier()
        r = {**measured(lambda: _index_phase(phase, w, rows)), "rank": rank}
        return {**r, "index_sha256": _digest([added])} if phase == "index" else r
    if phase == "neighbours":
        write_neighbours(w, rows, 100_000)

    def read():
        nb = load_neighbors(w, "train") if phase.endswith("in_memory") else map_neighbors(w, "train")
        total = 0
        for lo in range(0, rows, ROWS_PER_SAMPLE):
            total += int(nb[lo:lo + ROWS_PER_SAMPLE][:, 0].sum())
        return {"rows": rows, "checksum": total}

    return measured(read)


def chunk_db_alone(docs: int, root: Path) -> dict:
    """chunk_db.build over `docs` synthetic documents (100 to 1100 tokens, 600 on average) in this
    process: its memory against the document count alone, up to sizes the corpus phases do not reach."""
    import numpy as np

    from retro_toolkit.collections.retrieval import chunk_db

    out = np.lib.format.open_memmap(root / "offsets.npy", mode="w+", dtype=np.int64, shape=(docs + 1,))
    rng, out[0] = np.random.default_rng(0), 0
    for lo in range(0, docs, 1 << 16):  # written a piece at a time: the baseline holds none of it
        hi = min(docs, lo + (1 << 16))
        out[lo + 1:hi + 1] = out[lo] + np.cumsum(rng.integers(100, 1100, hi - lo))
    out.flush()
    del out
    offsets = np.load(root / "offsets.npy", mmap_mode="r")  # as build_db reads a split's offsets
    r = measured(lambda: {"chunks": len(chunk_db.build([chunk_db.Part("train", offsets)], 64, root / "chunks.h5"))})
    return {"documents": docs, "tokens": int(offsets[-1]), **r}


def _digest(paths: list[Path]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for f in paths:
        with open(f, "rb") as fh:
            for piece in iter(lambda: fh.read(1 << 24), b""):
                digest.update(piece)
    return digest.hexdigest()


def synthetic_vectors(start: int, end: int):
    """Block [start, end)'s vectors: 64 cluster centres plus noise, seeded by the block."""
    import numpy as np

    centres = np.random.default_rng(7).standard_normal((64, DIM)).astype(np.float32)
    rng = np.random.default_rng(start)
    return centres[rng.integers(0, 64, end - start)] + 0.3 * rng.standard_normal((end - start, DIM), dtype=np.float32)


def _index_phase(phase: str, w: Path, rows: int) -> dict:
    import numpy as np

    from retro_toolkit.collections.retrieval import blocks, index as faiss_index, ivf_fill
    from retro_toolkit.core import dist

    env = dist.env_from_os()
    folder = w / "synthetic_index"
    trained_file, added, codes_dir = folder / "trained.faissindex", folder / "added.faissindex", folder / "codes"
    spans = blocks.ranges(rows, EMB_BLOCK)
    if phase.startswith("search"):
        index = faiss_index.load(added, mmap=True, search_tables=phase == "search_table")
        faiss_index.set_nprobe(index, 8)
        found = checksum = 0
        for i, (s, e) in enumerate(spans):
            if i % env.world_size == env.rank:
                _, ids = faiss_index.search(index, synthetic_vectors(s, e), 20)
                found += int((ids >= 0).sum())
                checksum += int((ids * np.arange(1, 21)).sum() % (1 << 61))
        return {"queries": sum(e - s for i, (s, e) in enumerate(spans) if i % env.world_size == env.rank),
                "found": found, "ids_checksum": checksum}
    trained_seconds = 0.0
    if env.is_main and not trained_file.is_file():  # a 2-rank run reuses the trained index, as build_db does
        nlist = max(1, rows // LIST_CHUNKS)
        index = faiss_index.make(f"IVF{nlist}_{QUANTIZER},{CODES}", DIM)
        faiss_index.skip_search_tables(index)  # as build_db's index step
        t = time.perf_counter()
        faiss_index.train(index, synthetic_vectors(10**9, 10**9 + TRAIN_VECTORS), use_gpu=False)
        trained_seconds = time.perf_counter() - t
        faiss_index.save(index, trained_file)
    dist.barrier()
    trained = faiss_index.load(trained_file, search_tables=False)
    blocks.compute_missing(codes_dir, rows, spans, lambda s, e: faiss_index.encode(trained, synthetic_vectors(s, e)),
                           "synthetic", env.rank, env.world_size)
    dist.barrier()
    if env.is_main:
        ivf_fill.write_filled(trained, lambda: ((np.arange(s, e), c) for s, e, c in blocks.iter_blocks(codes_dir, rows, spans, "synthetic")),
                              added, FILL_WINDOW)
    dist.barrier()
    import faiss

    return {"vectors": rows, "index": f"IVF{faiss.extract_index_ivf(trained).nlist}_{QUANTIZER},{CODES}",
            "index_bytes": added.stat().st_size, "train_seconds": round(trained_seconds, 3)}


def two_ranks(phase: str, w: Path, env: dict, one: dict, tokens: float) -> dict:
    """`phase` on 2 ranks: each rank's memory and time against the 1-rank run, and whether
    they wrote the same files (corpus, index) or found the same neighbours (search)."""
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        __file__, "--phase", phase, "--workdir", str(w)], env=env, capture_output=True, text=True)
    found = sorted(w.glob(f".result.{phase}.*.json"))
    per_rank = [json.loads(f.read_text()) for f in found]
    for f in found:
        f.unlink()
    if p.returncode != 0 or len(per_rank) != 2:
        raise SystemExit(f"{phase} on 2 ranks failed:\n{p.stdout}\n{p.stderr}")
    same = {"corpus": lambda: all(r["corpus_sha256"] == one["corpus_sha256"] for r in per_rank),
            "index": lambda: all(r["index_sha256"] == one["index_sha256"] for r in per_rank),
            "search": lambda: sum(r["ids_checksum"] for r in per_rank) == one["ids_checksum"]}[phase]()
    out = {"per_rank": per_rank, "same_output_as_1_rank": same,
           "max_peak_rss_anon_increase_over_1_rank": round(
               max(r["peak_rss_anon_increase"] for r in per_rank) / max(one["peak_rss_anon_increase"], 1), 2),
           "max_peak_rss_increase_over_1_rank": round(
               max(r["peak_rss_increase"] for r in per_rank) / max(one["peak_rss_increase"], 1), 2),
           "seconds": max(r["seconds"] for r in per_rank),
           "seconds_1_rank_without_training": round(one["seconds"] - one.get("train_seconds", 0), 3)}
    print(f"{int(tokens):>12} {phase + ', 2 ranks':<22} {out['seconds']:8.2f} s  per-rank RssAnon "
          f"{[round(r['peak_rss_anon_increase'] / 2**20, 1) for r in per_rank]} MiB, same output: {same}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=float, nargs="+", default=[1e7, 1e8])
    ap.add_argument("--root", type=Path, help="where corpora are written (default: a temporary folder)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2], choices=[1, 2],
                    help="with 2: run the corpus, index and search phases on 2 ranks too (torchrun, gloo) "
                         "and compare each rank with 1")
    ap.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--chunk-db-docs", type=int, nargs="+",
                    help="instead: chunk_db.build alone over this many synthetic documents each, a fresh process "
                         "per size (e.g. 16000 160000 1600000: about 10^7, 10^8 and 10^9 tokens)")
    add_out(ap, __file__)
    a = ap.parse_args()
    if a.chunk_db_docs and a.workdir:  # a child: one size
        (a.workdir / "result.json").write_text(json.dumps(chunk_db_alone(a.chunk_db_docs[0], a.workdir)))
        return
    if a.chunk_db_docs:
        rows = []
        for docs in a.chunk_db_docs:
            with tempfile.TemporaryDirectory(dir=a.root) as tmp:
                subprocess.run([sys.executable, __file__, "--chunk-db-docs", str(docs), "--workdir", tmp], check=True)
                rows.append(json.loads((Path(tmp) / "result.json").read_text()))
            print(f"{docs:>10} documents  RssAnon +{rows[-1]['peak_rss_anon_increase'] / 2**20:6.1f} MiB", flush=True)
        write_result({"machine": {"cpus": os.cpu_count()}, "chunk_db_alone": rows}, a.out)
        return
    if a.phase:  # a child: one phase, its result in a file of its own (ranks would interleave on stdout)
        result = run_phase(a.phase, a.workdir)
        (a.workdir / f".result.{a.phase}.{os.environ.get('RANK', 0)}.json").write_text(json.dumps(result))
        return
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    results = []
    with tempfile.TemporaryDirectory(dir=a.root) as tmp:
        for tokens in a.tokens:
            root = Path(tmp) / f"t{int(tokens)}"
            root.mkdir()
            t = time.perf_counter()
            w = make_corpus(root, int(tokens))
            made = time.perf_counter() - t
            row = {"tokens": int(tokens), "corpus_write_seconds": round(made, 1), "phases": {}}
            for phase in PHASES:
                p = subprocess.run([sys.executable, __file__, "--phase", phase, "--workdir", str(w)], env=env,
                                   capture_output=True, text=True)
                result = w / f".result.{phase}.0.json"
                if p.returncode != 0 or not result.is_file():
                    raise SystemExit(f"phase {phase} failed:\n{p.stdout}\n{p.stderr}")
                r = json.loads(result.read_text())
                result.unlink()
                # Training the index costs the same at any size: per-token time counts the rest.
                r["seconds_per_1e6_tokens"] = round((r["seconds"] - r.get("train_seconds", 0)) / (tokens / 1e6), 4)
                row["phases"][phase] = r
                print(f"{int(tokens):>12} {phase:<22} {r['seconds']:8.2f} s  peak RSS +{r['peak_rss_increase'] / 2**20:8.1f} "
                      f"MiB  RssAnon +{r['peak_rss_anon_increase'] / 2**20:8.1f} MiB", flush=True)
            if 2 in a.ranks:
                for phase in RANKED:
                    row[f"{phase}_2_ranks"] = two_ranks(phase, w, env, row["phases"][phase], tokens)
            row["disk_bytes"] = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
            results.append(row)
            shutil.rmtree(root)
    ratios = {}
    if len(results) >= 2:
        lo, hi = results[0], results[-1]
        for phase in PHASES:
            a_, b_ = lo["phases"][phase], hi["phases"][phase]
            ratios[phase] = {
                "peak_rss_increase": round(b_["peak_rss_increase"] / max(a_["peak_rss_increase"], 1), 2),
                "peak_rss_anon_increase": round(b_["peak_rss_anon_increase"] / max(a_["peak_rss_anon_increase"], 1), 2),
                "seconds_per_token": round(b_["seconds_per_1e6_tokens"] / max(a_["seconds_per_1e6_tokens"], 1e-9), 2)}
    write_result({"machine": {"cpus": os.cpu_count()}, "results": results,
                  f"ratios_{int(results[-1]['tokens'])}_over_{int(results[0]['tokens'])}": ratios}, a.out)


if __name__ == "__main__":
    main()
