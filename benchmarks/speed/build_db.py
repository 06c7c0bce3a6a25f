r"""Benchmark build_db on the demo corpus (`pip install -e '.[demo]'`); writes JSON.

    python benchmarks/speed/build_db.py [--recipe recipes/demo_wiki.yaml] [--max-docs N] [--out FILE]

Measured in one run, side by side:
  - per sub-step wall time and items/s (from the stage manifest), peak RSS of the stage process;
  - (a) end-to-end embedding throughput / raw embedder throughput on the same chunk texts
        (goal >= 0.85: the pipeline - detokenising, hashing, block files - adds at most 15%);
  - (b) peak RSS with the corpus doubled / peak RSS at 1x (goal <= 1.3);
  - recall@2 of the recipe's index against exact (Flat) search, and its queries/s.

The recorded results:
    python benchmarks/speed/build_db.py --out benchmarks/results/build_db_demo_wiki.json
    python benchmarks/speed/build_db.py --max-docs 24 --raw-chunks 300 \
        --out benchmarks/results/build_db_wiki24docs_raw300.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from benchmarks.common import add_out, write_result  # noqa: E402


def sh(*args: str) -> None:
    p = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"failed: {' '.join(args)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")


def build(recipe: str, workdir: Path, sources: str) -> dict:
    """prepare_corpus through retro-run, then build_db alone in a process whose peak RSS we read."""
    sh(sys.executable, "-m", "retro_toolkit", recipe, f"workdir={workdir}", sources, "--stages", "prepare_corpus")
    probe = ("import resource, subprocess, sys, json, time; t = time.time(); "
             "rc = subprocess.run(sys.argv[1:]).returncode; "
             "print(json.dumps({'rc': rc, 'wall_s': time.time() - t, "
             "'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")
    p = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "retro_toolkit.launch", "build_db",
                        str(workdir / "recipe.resolved.yaml")], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    out = json.loads(p.stdout.strip().splitlines()[-1])
    if out["rc"]:
        sys.exit(f"build_db failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    out["manifest"] = json.loads((workdir / "stages" / "build_db.json").read_text())
    return out


def raw_embed_rate(workdir: Path, limit: int) -> tuple[float, int]:
    """Chunks/s of the embedder alone on the database's own chunk texts (texts made beforehand)."""
    from retro_toolkit.collections.retrieval import chunk_db
    from retro_toolkit.collections.retrieval.build_db import chunk_text, database_tokens
    from retro_toolkit.collections.retrieval.embedder import BertEmbedder
    from retro_toolkit.core.dist import cpus_per_rank
    from retro_toolkit.collections.text.tokenizer import workdir_tokenizer
    from retro_toolkit.recipe import load_recipe

    r = load_recipe(str(workdir / "recipe.resolved.yaml"))
    db = chunk_db.load(workdir / chunk_db.CHUNKS_FILE)
    tokens, tok = database_tokens(workdir, db), workdir_tokenizer(workdir)
    n = min(limit, len(db)) if limit else len(db)
    texts = [chunk_text(tok, tokens[s:e]) for s, e in zip(db.chunk_start[:n], db.chunk_end[:n])]
    e = r.retrieval.embedder
    emb = BertEmbedder(e.path, e.max_tokens, e.batch_size, threads=cpus_per_rank(1))
    emb.embed(texts[: e.batch_size])  # warm up
    t = time.perf_counter()
    emb.embed(texts)
    return n / (time.perf_counter() - t), n


def recall_at_2(workdir: Path, nprobe: int, k_query: int) -> dict:
    """Top-2 of the recipe's index vs exact search, over every stored query embedding."""
    import faiss

    from retro_toolkit.collections.retrieval import blocks
    from retro_toolkit.collections.retrieval import index as faiss_index
    from retro_toolkit.core import files

    meta = files.read_json(workdir / "neighbors" / "meta.json")
    db_emb = np.concatenate([blocks.read(f) for f in sorted((workdir / "db" / "embeddings").glob("*.h5"))])
    queries = np.concatenate([blocks.read(f) for split in meta["splits"]
                              for f in sorted((workdir / "db" / "query_embeddings" / split).glob("*.h5"))])
    exact = faiss.IndexFlatL2(db_emb.shape[1])
    exact.add(db_emb)
    _, truth = exact.search(queries, 2)
    index = faiss_index.load(workdir / "index" / faiss_index.folder_name(meta["index"]) / "added.faissindex")
    faiss_index.set_nprobe(index, nprobe)
    t = time.perf_counter()
    _, got = index.search(queries, k_query)
    qps = len(queries) / (time.perf_counter() - t)
    hits = [len(set(a[:2]) & set(b)) for a, b in zip(got, truth)]
    return {"index": meta["index"], "nprobe": nprobe, "queries": len(queries),
            "recall_at_2": float(np.mean(hits) / 2), "queries_per_s": qps, "k_query": k_query}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "demo_wiki.yaml"))
    ap.add_argument("--source", default="builtin:wiki-sample")
    ap.add_argument("--max-docs", type=int, default=None, help="documents per copy of the corpus (default all)")
    ap.add_argument("--raw-chunks", type=int, default=0,
                    help="chunks for the raw embedder rate (default 0 = all, the same chunks the pipeline embeds)")
    add_out(ap, __file__)
    args = ap.parse_args()

    from retro_toolkit.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    src = f"{{path: {args.source}, max_docs: {args.max_docs if args.max_docs else 'null'}}}"
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench-build-db-") as tmp:
        for scale in (1, 2):
            w = Path(tmp) / f"x{scale}"
            runs[scale] = build(args.recipe, w, "data.sources=[" + ",".join([src] * scale) + "]")
            if scale == 1:
                raw_rate, raw_n = raw_embed_rate(w, args.raw_chunks)
                recall = recall_at_2(w, recipe.retrieval.index.nprobe, recipe.retrieval.k_query)
    m1 = runs[1]["manifest"]["summary"]
    t = m1["timings"]
    steps = {"embed": {"items": m1["db_chunks"], "wall_s": t["embed_s"], "items_per_s": m1["db_chunks"] / t["embed_s"]},
             "index": {"items": m1["db_chunks"], "wall_s": t["index_s"], "items_per_s": m1["db_chunks"] / max(t["index_s"], 1e-9)}}
    for split in recipe.retrieval.query_splits:
        q = m1[f"{split}_queries"]
        steps[f"neighbors_{split}"] = {"items": q, "wall_s": t[f"neighbors_{split}_s"],
                                       "items_per_s": q / max(t[f"neighbors_{split}_s"], 1e-9)}
    result = {
        "recipe": args.recipe, "max_docs": args.max_docs, "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "steps": steps,
        "stage_wall_s": {"1x": runs[1]["wall_s"], "2x": runs[2]["wall_s"]},
        "peak_rss_mb": {"1x": runs[1]["peak_rss_mb"], "2x": runs[2]["peak_rss_mb"]},
        "raw_embedder": {"chunks": raw_n, "chunks_per_s": raw_rate},
        "ratios": {
            "embed_pipeline_over_raw": steps["embed"]["items_per_s"] / raw_rate,
            "peak_rss_2x_over_1x": runs[2]["peak_rss_mb"] / runs[1]["peak_rss_mb"],
        },
        "retrieval": recall,
    }
    write_result(result, args.out, echo=True)


if __name__ == "__main__":
    main()
