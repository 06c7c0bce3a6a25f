"""Training an IVF-PQ index with and without polysemous codes, side by side in one process.

    python benchmarks/speed/index_train.py [--threads 2] [--out FILE.json]

faiss's index_factory trains polysemous codes for every PQ string (a centroid order that only a
search with a Hamming threshold uses); build_db's `index.make` turns that off. For each index
string of benchmarks/scale.py (an HNSW coarse quantizer, PQ16 codes of 64-dim vectors, lists of
about 1024 chunks at 10^7 and 10^8 tokens) and a PQ64 one (InstructRetro's code size), both
are trained on the same 65,536 synthetic vectors; both then hold the same 100,000 vectors
and search the same 2,000 queries (20 neighbours, nprobe 8), whose ids and distances are compared.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from benchmarks.common import add_out, write_result  # noqa: E402
from benchmarks.scale import DIM, TRAIN_VECTORS, synthetic_vectors  # noqa: E402

STRINGS = ["IVF157_HNSW32,PQ16", "IVF1568_HNSW32,PQ16", "IVF157_HNSW32,PQ64"]


def _one(string: str, train, queries, base) -> dict:
    import faiss
    import numpy as np

    from retro_toolkit.collections.retrieval import index as faiss_index

    out: dict = {"index": string}
    found = []
    for name, index in (("factory", faiss.index_factory(DIM, string)), ("toolkit", faiss_index.make(string, DIM))):
        t = time.perf_counter()
        index.train(train)
        out[f"{name}_train_seconds"] = round(time.perf_counter() - t, 2)
        index.add(base)
        faiss_index.set_nprobe(index, 8)
        found.append(index.search(queries, 20))
    out["speedup"] = round(out["factory_train_seconds"] / out["toolkit_train_seconds"], 1)
    (d0, i0), (d1, i1) = found
    out["same_ids"] = bool(np.array_equal(i0, i1))
    # The search tables are sums over centroids in stored order, so their rounding can differ.
    out["distances_differing"] = int((d0 != d1).sum())
    out["max_relative_distance_difference"] = float(np.max(np.abs(d0 - d1) / np.maximum(np.abs(d0), 1e-30)))
    print(out, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="faiss's OpenMP threads (default 2)")
    add_out(ap, __file__)
    a = ap.parse_args()
    import faiss

    faiss.omp_set_num_threads(a.threads)
    train = synthetic_vectors(10**9, 10**9 + TRAIN_VECTORS)
    base = synthetic_vectors(0, 100_000)
    queries = synthetic_vectors(2 * 10**9, 2 * 10**9 + 2_000)
    runs = [_one(s, train, queries, base) for s in STRINGS]
    write_result({"threads": a.threads, "train_vectors": TRAIN_VECTORS, "dim": DIM, "added": len(base),
                  "queries": len(queries), "runs": runs}, a.out)


if __name__ == "__main__":
    main()
