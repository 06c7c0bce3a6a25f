"""build_db's index step: train the faiss index (or reuse the trained one), encode every
database chunk into code blocks (split over ranks), and write the filled index (rank 0).

    index/<string>/keys.json           what the trained and the filled index were made from
    index/<string>/trained.faissindex  trained, empty
    index/<string>/codes/*.h5          each block's sa_encode codes
    index/<string>/added.faissindex    every live chunk added, faiss ids = chunk ids

The vectors come from the caller: read from stored embedding blocks, or embedded on the fly
(`retrieval.keep_embeddings: false`), so both ways share this step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from retro_toolkit.collections.retrieval import blocks, index as faiss_index, ivf_fill
from retro_toolkit.collections.retrieval.keys import sha
from retro_toolkit.core import dist, files
from retro_toolkit.core.stage import StageContext


@dataclass
class IndexPlan:
    string: str
    dim: int
    n: int
    spans: list[tuple[int, int]]
    block_keys: dict[int, str]  # each block's content key, by its first chunk
    train_key: str  # what training reads: the factory string, the sample, their vectors' keys
    folder: Path
    # Which chunks of a block are in the database (the others were taken out: not added, codes zeroed).
    live: Callable[[int, int], np.ndarray] | None = None

    @property
    def fill_key(self) -> str:
        return sha(self.train_key, [self.block_keys[s] for s, _ in self.spans])

    def code_key(self, start: int, end: int) -> str:
        return sha(self.train_key, self.block_keys[start])


def build(ctx: StageContext, plan: IndexPlan, training_vectors: Callable[[], np.ndarray],
          block_vectors: Callable[[int, int], np.ndarray], before_training: Callable[[], None] = lambda: None) -> None:
    """Make plan.folder/added.faissindex current. `before_training` runs on every rank when the
    index must be (re)trained, before rank 0 calls `training_vectors`; `block_vectors(s, e)` gives
    chunks s..e-1's vectors to the rank that encodes that block."""
    env, folder = ctx.env, plan.folder
    keys_file, trained_file, added_file = folder / "keys.json", folder / "trained.faissindex", folder / "added.faissindex"
    keys = files.read_json(keys_file) if keys_file.is_file() else {}
    filled, trained = dist.broadcast_object((keys.get("fill") == plan.fill_key and added_file.is_file(),
                                             keys.get("train") == plan.train_key and trained_file.is_file()))
    if filled:
        return
    index = None if trained else faiss_index.make(plan.string, plan.dim)
    if index is not None and not index.is_trained:  # Flat needs no training
        before_training()
    if env.is_main:
        if index is None:
            ctx.log(f"reusing the trained {plan.string} index (not retrained)")
        else:
            if not index.is_trained:
                faiss_index.skip_search_tables(index)
                vectors = training_vectors()
                ctx.log(f"training {plan.string} on {len(vectors)} vectors")
                where = faiss_index.train(index, vectors, ctx.recipe.retrieval.index.gpu_train)
                ctx.log(f"trained (clustering on {where})")
            faiss_index.save(index, trained_file)
            files.write_json(keys_file, {"train": plan.train_key})
    dist.barrier()

    index = faiss_index.load(trained_file, search_tables=False)
    codes_dir = folder / "codes"
    def encode(s: int, e: int) -> np.ndarray:
        codes = faiss_index.encode(index, block_vectors(s, e))
        if plan.live is not None:
            codes[~plan.live(s, e)] = 0
        return codes

    blocks.compute_missing(codes_dir, plan.n, plan.spans, encode, plan.code_key, env.rank, env.world_size)
    dist.barrier()
    if env.is_main:
        blocks.remove(blocks.stale_files(codes_dir, plan.n, plan.spans))

        def code_blocks():
            for s, e, codes in blocks.iter_blocks(codes_dir, plan.n, plan.spans, plan.code_key):
                ids = np.arange(s, e, dtype=np.int64)
                keep = plan.live(s, e) if plan.live is not None else None
                yield (ids, codes) if keep is None or keep.all() else (ids[keep], codes[keep])

        if ivf_fill.supported(index):  # the lists go to disk through a window, never whole in memory
            ivf_fill.write_filled(index, code_blocks, added_file, int(ctx.recipe.retrieval.index.memory_gb * 2**30))
        else:
            faiss_index.save(faiss_index.filled(index, code_blocks()), added_file)
        files.write_json(keys_file, {"train": plan.train_key, "fill": plan.fill_key})
    dist.barrier()
