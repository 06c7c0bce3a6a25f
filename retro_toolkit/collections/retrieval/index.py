"""The faiss index: choose a factory string, check it fits the corpus, train, add.

    index/<string>/trained.faissindex   trained, empty
    index/<string>/added.faissindex     every database chunk added, ids = chunk ids
"""

from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from retro_toolkit.core import files
from retro_toolkit.core.dist import cpus_per_rank
from retro_toolkit.errors import UserError

# faiss k-means wants this many points per centroid before it stops warning.
POINTS_PER_CENTROID = 39


def auto_string(n: int, dim: int, memory_gb: float) -> str:
    """A sound factory string for n vectors of size dim within a memory budget."""
    if n < 100_000:
        return "Flat"  # exact search is fast enough and needs no training
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    nlist = min(nlist, n // POINTS_PER_CENTROID)
    if n * dim * 4 <= memory_gb * 2**30 * 0.8:
        return f"IVF{nlist},Flat"
    m = max((m for m in (64, 48, 32, 16, 8, 4) if dim % m == 0), default=1)  # PQ sub-vectors divide dim
    return f"OPQ{m},IVF{nlist}_HNSW32,PQ{m}"


def min_train_points(string: str) -> int:
    """The fewest training vectors faiss accepts for this factory string."""
    need = 1
    for nlist in re.findall(r"IVF(\d+)", string):
        need = max(need, int(nlist))
    for _, nbits in re.findall(r"PQ(\d+)(?:x(\d+))?", string):
        need = max(need, 2 ** int(nbits or 8))
    return need


def folder_name(string: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.,-]", "_", string)


def check_fits(string: str, n: int, key: str = "retrieval.index.string") -> None:
    need = min_train_points(string)
    if n < need:
        raise UserError(
            f"{key} = {string!r} needs at least {need} training vectors, but the database has {n} chunks. "
            f"Use {key}=auto (picks Flat or a smaller IVF for this size), or add documents."
        )


def make(string: str, dim: int):
    """An untrained index of a faiss factory string, without polysemous codes: faiss's factory
    trains them for PQ codes, a centroid order that only a search with a Hamming threshold
    (polysemous_ht) uses, which nothing here sets. The centroids are the same, in another order,
    and training IVF-PQ is 2.5 to 14 times faster (benchmarks/speed/index_train.py)."""
    import faiss

    try:
        index = faiss.index_factory(dim, string, faiss.METRIC_L2)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1]
        raise UserError(f"retrieval.index.string = {string!r} is not a faiss factory string faiss accepts ({msg}).") from None
    codes = unwrapped(index)
    if hasattr(codes, "do_polysemous_training"):  # IVF-PQ and PQ
        codes.do_polysemous_training = False
    return index


def unwrapped(index):
    """The index that holds the codes, under the OPQ/PCA transforms and IDMap around it."""
    import faiss

    inner = faiss.downcast_index(index)
    while isinstance(inner, (faiss.IndexPreTransform, faiss.IndexIDMap)):
        inner = faiss.downcast_index(inner.index)
    return inner


def check_fillable(string: str, key: str = "retrieval.index.string") -> None:
    """Fail unless faiss can add precomputed codes to this index type: build_db fills the index
    block by block from stored codes, and an update of the database adds to it the same way."""
    import faiss

    try:  # a dimension most sub-vector counts divide; the embedder's is checked when it is loaded
        index = faiss.index_factory(3072, string)
    except RuntimeError:
        return
    try:
        index.sa_code_size()
    except RuntimeError:
        raise UserError(
            f"{key} = {string!r}: faiss cannot add precomputed codes to this index type (a graph index such as "
            "HNSW or NSG is built from the raw vectors), so build_db can neither fill it block by block nor add "
            "documents to it when the database is updated. Use a type that can: Flat, IVF<lists>,Flat, "
            "IVF<lists>,PQ<m>, or an HNSW coarse quantizer as in IVF<lists>_HNSW32,PQ<m>.") from None


def set_threads(local_world_size: int) -> int:
    """faiss's threads for one of `local_world_size` ranks on this machine; returns the count."""
    import faiss

    threads = cpus_per_rank(local_world_size)
    faiss.omp_set_num_threads(threads)
    return threads


def set_nprobe(index, nprobe: int) -> None:
    import faiss

    try:
        faiss.extract_index_ivf(index).nprobe = nprobe
    except RuntimeError:
        pass  # not an IVF index


def save(index, path: Path) -> None:
    import faiss

    with files.atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def load(path: Path, mmap: bool = False, search_tables: bool = True):
    """Read an index; with mmap, its codes stay in the page cache that every rank on the node
    shares (faiss maps Flat and IVF inverted lists), else it is read into this process.
    search_tables=False skips IVF-PQ's precomputed search table (lists x M x 256 floats, up to
    faiss's 2 GiB cap), which only searching uses: encoding and filling do not need it."""
    import faiss

    flags = 0 if search_tables else faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE
    if mmap:
        try:
            return faiss.read_index(str(path), flags | faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:
            pass  # an index type faiss cannot map: read it
    return faiss.read_index(str(path), flags)


def skip_search_tables(index) -> None:
    """Training an IVF-PQ index also builds its search table; an index trained to be saved
    and encoded with does not need it."""
    import faiss

    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        return  # not an IVF index
    if hasattr(ivf, "use_precomputed_table"):
        ivf.use_precomputed_table = -1


def num_gpus() -> int:
    """GPUs faiss can use: 0 with faiss-cpu (the wheel this project installs) or no GPU."""
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def train(index, vectors: np.ndarray, use_gpu: bool = True) -> str:
    """Train `index`; with faiss-gpu and a GPU, IVF k-means runs on every visible GPU.
    Returns where the clustering ran ("gpu" or "cpu")."""
    import faiss

    where = "cpu"
    if use_gpu and num_gpus() > 0:
        try:
            ivf = faiss.extract_index_ivf(index)
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
            where = "gpu"
        except RuntimeError:
            pass  # not an IVF index: nothing to cluster on the GPU
    index.train(np.ascontiguousarray(vectors, dtype=np.float32))
    return where


def to_gpu(index, device: int):
    """A GPU copy of `index` for searching, or the index itself where faiss has no GPU
    version of it (e.g. an HNSW coarse quantizer)."""
    import faiss

    try:
        res = faiss.StandardGpuResources()
        opts = faiss.GpuClonerOptions()
        opts.useFloat16 = True  # PQ lookup tables above 48 bytes need half precision on the GPU
        return faiss.index_cpu_to_gpu(res, device, index, opts)
    except (RuntimeError, AttributeError):
        return index


def training_sample(n: int, ntrain: int | None, seed: int) -> np.ndarray:
    """Sorted chunk ids to train on: all when small, else a seeded sample."""
    size = min(n, ntrain or 1_000_000)
    if size >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False)).astype(np.int64)


# faiss's results depend on the rows of a call and on its OpenMP thread count (its BLAS path
# rounds differently: a near-tie vector can land in another IVF list). So encoding and search
# run as calls of fixed rows, one thread each, in parallel threads: a block's codes and
# neighbours are the same whatever the number of ranks or cores.
ROWS_PER_CALL = 2048
_pool: list = []  # one (threads, ThreadPoolExecutor): the same threads, and malloc arenas, for every call


def _fixed_calls(fn: Callable[[int, int], object], n: int) -> None:
    """fn(lo, hi) for rows [lo, hi) of n, in calls of ROWS_PER_CALL rows on the pool's threads.
    fn writes into arrays the caller allocated: arrays made in a pool thread would come from
    that thread's malloc arena, which keeps them after they are freed, a block's worth per thread."""
    import faiss

    def one(lo: int):
        faiss.omp_set_num_threads(1)  # this pool thread's own OpenMP setting
        return fn(lo, min(n, lo + ROWS_PER_CALL))

    threads = max(1, faiss.omp_get_max_threads())
    if not _pool or _pool[0][0] != threads:
        if _pool:
            _pool.pop()[1].shutdown()
        _pool.append((threads, ThreadPoolExecutor(threads, thread_name_prefix="faiss")))
    for _ in _pool[0][1].map(one, range(0, n, ROWS_PER_CALL)):
        pass


def encode(index, vectors: np.ndarray) -> np.ndarray:
    """The codes `index` stores for these vectors (any rank can do this in parallel)."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    codes = np.empty((len(x), index.sa_code_size()), dtype=np.uint8)
    _fixed_calls(lambda lo, hi: index.sa_encode(x[lo:hi], codes[lo:hi]), len(x))
    return codes


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances, ids) of the k nearest, as index.search, the same on any number of threads
    (a CPU index; a GPU index is searched directly)."""
    x = np.ascontiguousarray(queries, dtype=np.float32)
    distances, ids = np.empty((len(x), k), dtype=np.float32), np.empty((len(x), k), dtype=np.int64)
    _fixed_calls(lambda lo, hi: index.search(x[lo:hi], k, D=distances[lo:hi], I=ids[lo:hi]), len(x))
    return distances, ids


def add_codes(index, codes: np.ndarray, ids: np.ndarray) -> None:
    """Append precomputed codes (no re-encoding). An IVF index stores the ids; other types
    number their entries 0, 1, ... (see `filled`)."""
    import faiss

    target = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
    target.add_sa_codes(codes, np.ascontiguousarray(ids, dtype=np.int64))
    index.ntotal = target.ntotal


def filled(index, code_blocks) -> object:
    """`index` (trained, empty) with every (ids, codes) block added. A type that numbers its
    entries itself (Flat, PQ, SQ) is wrapped in an IDMap when the ids have gaps (chunks taken
    out of the database); an IVF index stores the ids in its lists."""
    import faiss

    try:
        faiss.extract_index_ivf(index)
        wrapper = None
    except RuntimeError:
        wrapper = faiss.IndexIDMap(index)
    all_ids = []
    for ids, codes in code_blocks:
        add_codes(index, codes, ids)
        all_ids.append(np.asarray(ids, dtype=np.int64))
    ids = np.concatenate(all_ids) if all_ids else np.zeros(0, dtype=np.int64)
    if wrapper is None or np.array_equal(ids, np.arange(len(ids))):
        return index
    faiss.copy_array_to_vector(ids, wrapper.id_map)
    wrapper.ntotal = index.ntotal
    return wrapper
