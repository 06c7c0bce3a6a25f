r"""Can Retro learn to copy real text from its neighbours within a CPU budget?

    python benchmarks/probes/oracle_neighbours.py WORKDIR [key=value ...] [--iters 200] [--max-shift 0] [--out FILE.json]

Trains the work directory's Retro model from its initial weights on the train split, with
every chunk's neighbours replaced by the oracle: the chunk itself plus the text that follows
it in the stream (all k neighbours the same), so the positions a chunk's neighbours serve
can be copied exactly. Its GPT twin trains beside it on the same batches and schedule.
A loss that falls far below the twin's says chunked cross-attention learns to copy real
text at this size and learning rate, so whatever limits a run on the database's neighbours
is in those neighbours; a loss that stays with the twin's says the model or its
optimisation is the limit. With --max-shift S each chunk's oracle starts a random 0..S-1
tokens later (seeded per sample): the continuation is all there but no longer at a fixed
offset, so copying it needs finding the place by content, as with a retrieved near-copy.
Reads a work directory after prepare_corpus (the database is not used); writes only under
WORKDIR/oracle_neighbours/ and the result file.

The recorded results, on a work directory of 64-token chunks on the transformers modeling files
(`retro-run recipes/retro_vs_gpt_demo.yaml model.chunk_length=64 workdir=/tmp/tm/demo`):
    python benchmarks/probes/oracle_neighbours.py /tmp/tm/demo pretrain.retrieval_lr_mult=1 --iters 200 \
        --out benchmarks/results/oracle_neighbours_transformers_modeling.json
    python benchmarks/probes/oracle_neighbours.py /tmp/tm/demo pretrain.retrieval_lr_mult=1 --iters 200 \
        --max-shift 32 --out benchmarks/results/oracle_neighbours_transformers_modeling_shift32.json
    python benchmarks/probes/oracle_neighbours.py /tmp/tm/demo pretrain.retrieval_lr_mult=1 \
        'model.cca_layers=[1,2,3,4]' --iters 150 --max-shift 32 \
        --out benchmarks/results/oracle_neighbours_transformers_modeling_shift32_cca1234.json
    python benchmarks/probes/oracle_neighbours.py /tmp/tm/demo pretrain.retrieval_lr_mult=1 --iters 600 \
        --max-shift 32 --out benchmarks/results/oracle_neighbours_transformers_modeling_shift32_600.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from retro_toolkit.core import malloc  # noqa: E402

# As the training stages run (before torch allocates).
malloc.keep_freed_memory()

from benchmarks.common import add_out, write_result  # noqa: E402
from retro_toolkit.collections.retro import engine  # noqa: E402
from retro_toolkit.collections.retro import pretrain as pt  # noqa: E402
from retro_toolkit.collections.retro import training  # noqa: E402
from retro_toolkit.errors import UserError  # noqa: E402
from retro_toolkit.recipe import load_recipe  # noqa: E402


class OracleNeighbours:
    """The train samples with neighbours [l, k, r] cut from the stream at each chunk's start."""

    def __init__(self, data, max_shift: int = 0):
        self.data = data
        self.windows = data.windows
        self.max_shift = max_shift

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        d = self.data
        sample = dict(d[i])
        start = d.window(i) * d.seq_length
        rows = []
        rng = np.random.default_rng([d.seed, i])
        for c in range(d.seq_length // d.m):
            a = start + c * d.m + (int(rng.integers(self.max_shift)) if self.max_shift > 0 else 0)
            row = np.asarray(d.stream.tokens[a:a + d.r], dtype=np.int64)
            rows.append(np.pad(row, (0, d.r - len(row)), constant_values=d.pad_id))
        sample["neighbor_tokens"] = np.repeat(np.stack(rows)[:, None, :], d.k, axis=1)
        return sample


def window_means(losses: list[float], width: int) -> list[float]:
    return [round(float(np.mean(losses[s:s + width])), 4) for s in range(0, len(losses), width)]


def train(recipe, arch: str, data, iters: int, scratch: Path) -> list[float]:
    p = recipe.pretrain
    overrides = training.precision_overrides(False, False)
    model, config, _ = engine.build(recipe, arch, overrides)
    if arch == "gpt":  # the twin starts from the Retro model's decoder, as in the pretrain stage
        pt.start_twin_like_retro(recipe, model, overrides)
    ddp, opt, sched = training.wrap_and_optimizer(model, p, config)
    batches = training.Batches(data, p.global_batch_size, p.micro_batch_size, 0, 1)
    metrics = training.MetricsLog(scratch, arch, 0, False, True)  # starts the file afresh
    training.train(ddp, opt, sched, batches, 0, iters, recipe.model.seq_length, metrics,
                   lambda msg: print(f"{arch}: {msg}", flush=True), max(1, iters // 20))
    metrics.close()
    return [json.loads(line)["loss"] for line in metrics.path.read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("overrides", nargs="*", help="recipe overrides on top of the resolved recipe (pretrain.lr=2e-3)")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--max-shift", type=int, default=0, help="start each oracle 0..N-1 tokens late (random)")
    add_out(ap, __file__)
    a = ap.parse_args()
    resolved = a.workdir / "recipe.resolved.yaml"
    try:
        if not resolved.exists():
            raise UserError(f"{resolved} is missing: run retro-run on this work directory first.")
        recipe = load_recipe(str(resolved), [*a.overrides, f"pretrain.train_iters={a.iters}"])
        n = a.iters * recipe.pretrain.global_batch_size
        if not 0 <= a.max_shift <= recipe.model.chunk_length:
            raise UserError(f"--max-shift must be 0..{recipe.model.chunk_length} (the chunk length), not {a.max_shift}.")
        # The oracle is cut from the stream, so the database's neighbours are never read and
        # model.chunk_length / num_neighbors / num_retrieved_chunks may differ from build_db's.
        twin_data = engine.dataset(recipe, "train", "gpt", n)
        oracle_data = OracleNeighbours(twin_data, a.max_shift)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    scratch = a.workdir / "oracle_neighbours"
    t0 = time.perf_counter()
    oracle = train(recipe, "retro", oracle_data, a.iters, scratch)
    twin = train(recipe, "gpt", twin_data, a.iters, scratch)
    width = max(1, a.iters // 10)
    write_result({
        "workdir": str(a.workdir),
        "iters": a.iters,
        "seconds": round(time.perf_counter() - t0, 1),
        "window": width,
        "max_shift": a.max_shift,
        "retro_oracle_loss": window_means(oracle, width),
        "gpt_twin_loss": window_means(twin, width),
    }, a.out)


if __name__ == "__main__":
    main()
