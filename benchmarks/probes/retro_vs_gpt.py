r"""Retro against its GPT twin: one run of a recipe, and what it measured.

    python benchmarks/probes/retro_vs_gpt.py RECIPE [key=value ...] [--neighbour-signal] [--window 100]
        [--out FILE.json]

Runs `retro-run RECIPE key=value ...` (stages already done in its work directory are
skipped, so on a finished run this only reads it), then records from the work directory:
  valid, test         eval/ppl.json: Retro's perplexity, Retro's with its retrieval gate at 0,
                      and the GPT twin's where the recipe trains one
  train_loss_*        each model's mean training loss per --window steps (metrics/*.jsonl),
                      and Retro's minus the twin's
  s_per_iter, pretrain_seconds, build_db_seconds, database_chunks
                      from the stage manifests
  corpus              the split rule, documents and tokens per split (corpus/meta.json)
  versions            Python's and transformers': the bundled source-code corpora are their
                      installed files, so those corpora move with the versions
With --neighbour-signal, benchmarks/probes/neighbour_signal.py's bigram hits on the valid and
train splits are added (the work directory needs a database).

The recorded results, benchmarks/results/retro_vs_gpt/NAME.json (docs/retro_vs_gpt.md); each
command is run as `python benchmarks/probes/retro_vs_gpt.py ARGS --out benchmarks/results/retro_vs_gpt/NAME.json`:
  NAME                          ARGS
  transformers_chunk16_600      recipes/retro_vs_gpt_demo.yaml
  transformers_chunk16_600_v5.24  recipes/retro_vs_gpt_demo.yaml --neighbour-signal   (*)
  transformers_chunk64_300      recipes/retro_vs_gpt_demo.yaml model.chunk_length=64 pretrain.train_iters=300
                                workdir=runs/transformers_chunk64_300 --neighbour-signal
  transformers_chunk64_900      recipes/retro_vs_gpt_demo.yaml model.chunk_length=64 pretrain.train_iters=900
                                workdir=runs/transformers_chunk64_900
  transformers_chunk64_300_lr_mult5
                                recipes/retro_vs_gpt_demo.yaml model.chunk_length=64 pretrain.train_iters=300
                                pretrain.retrieval_lr_mult=5 pretrain.gpt_twin=false workdir=runs/transformers_lr_mult5
  wiki_scratch_300              recipes/retro_vs_gpt_demo.yaml data=wiki_sample data.split_by=passage
                                model.chunk_length=64 pretrain.train_iters=300 workdir=runs/wiki_scratch_300
                                --neighbour-signal
  wiki_gpt_600                  recipes/gpt_demo.yaml
  wiki_continued_300            recipes/retro_vs_gpt_demo.yaml data=wiki_sample data.split_by=passage
                                model.chunk_length=64 workdir=runs/wiki_continued_300 model.cca_zero_init=true
                                pretrain.train_iters=300 tokenizer.model=runs/gpt_demo/tokenizer/
                                pretrain.init_from=runs/gpt_demo/checkpoints/pretrain pretrain.lr=5e-4
                                pretrain.min_lr=5e-5
  wiki_continued_900            the same with workdir=runs/wiki_continued_900 pretrain.train_iters=900
                                pretrain.save_interval=300
  stdlib_scratch_300            recipes/retro_vs_gpt_demo.yaml data=python_stdlib data.split_by=passage
                                model.chunk_length=64 pretrain.train_iters=300 model.cca_zero_init=true
                                workdir=runs/stdlib_scratch_300 --neighbour-signal
  stdlib_gpt_600                recipes/gpt_demo.yaml data=python_stdlib workdir=runs/stdlib_gpt_600
  stdlib_continued_600          recipes/retro_vs_gpt_demo.yaml data=python_stdlib data.split_by=passage
                                model.chunk_length=64 model.cca_zero_init=true pretrain.train_iters=600
                                pretrain.init_from=runs/stdlib_gpt_600/checkpoints/pretrain pretrain.lr=5e-4
                                pretrain.min_lr=5e-5 tokenizer.model=runs/stdlib_gpt_600/tokenizer/
                                workdir=runs/stdlib_continued_600
(*) measured with transformers 5.24.0 and neighbours excluded only from the query chunk's and
the next chunk's documents, not from every document of the sample's window (docs/retro_vs_gpt.md).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from benchmarks.common import add_out, write_result  # noqa: E402
from benchmarks.probes.neighbour_signal import split_signal  # noqa: E402
from retro_toolkit.core import files  # noqa: E402
from retro_toolkit.errors import UserError  # noqa: E402
from retro_toolkit.recipe import load_recipe  # noqa: E402

TWIN = "pretrain_gpt_twin"


def retro_run(recipe: str, overrides: list[str]) -> None:
    """The recipe through retro-run in this directory; its exit status ends this script when not 0."""
    rc = subprocess.run([sys.executable, "-m", "retro_toolkit", recipe, *overrides], check=False).returncode
    if rc:
        sys.exit(rc)


def manifest(workdir: Path, stage: str) -> dict | None:
    path = workdir / "stages" / f"{stage}.json"
    return files.read_json(path) if path.exists() else None


def window_means(metrics: Path, width: int) -> list[float]:
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    return [round(float(np.mean(losses[s:s + width])), 4) for s in range(0, len(losses), width)]


def training_figures(workdir: Path, arch: str, window: int) -> dict:
    """Seconds per iteration and windowed training loss of the model and its twin."""
    names = {"pretrain": arch, TWIN: "gpt_twin"}
    pretrain = manifest(workdir, "pretrain")
    if pretrain is None:
        raise UserError(f"{workdir} has no finished pretrain stage.")
    summary = pretrain["summary"]
    out: dict = {
        "pretrain_seconds": pretrain["timings"]["wall_s"],
        "s_per_iter": {label: summary[f"{n}_s_per_iter"] for n, label in names.items() if f"{n}_s_per_iter" in summary},
        "window": window,
    }
    loss = {label: window_means(workdir / "metrics" / f"{n}.jsonl", window)
            for n, label in names.items() if (workdir / "metrics" / f"{n}.jsonl").exists()}
    out["train_loss_per_window"] = loss
    if "retro" in loss and "gpt_twin" in loss:
        out["train_loss_retro_minus_twin_per_window"] = [round(a - b, 4)
                                                         for a, b in zip(loss["retro"], loss["gpt_twin"])]
    return out


def collect(workdir: Path, window: int, signal_samples: int | None) -> dict:
    """What the finished run in `workdir` measured (see the module's help)."""
    recipe = load_recipe(str(workdir / "recipe.resolved.yaml"))
    meta = files.read_json(workdir / "corpus" / "meta.json")
    result: dict = {
        "workdir": str(workdir),
        "versions": {"python": platform.python_version(), "transformers": importlib.metadata.version("transformers")},
        "corpus": {"split_by": meta["split_by"],
                   **{s: {"documents": v["documents"], "tokens": v["tokens"]} for s, v in meta["splits"].items()}},
    }
    build_db = manifest(workdir, "build_db")
    if build_db is not None:
        result["database_chunks"] = build_db["summary"]["db_chunks"]
        result["build_db_seconds"] = build_db["timings"]["wall_s"]
    result.update(training_figures(workdir, recipe.model.arch, window))
    if signal_samples is not None:
        result["neighbour_signal"] = {s: split_signal(recipe, s, signal_samples) for s in ("valid", "train")}
    ppl = workdir / "eval" / "ppl.json"
    if not ppl.exists():
        raise UserError(f"{ppl} is missing: the recipe's stages must include eval_ppl.")
    result.update(files.read_json(ppl))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", help="recipe file or bundled recipe name, as retro-run takes it")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="retro-run's overrides")
    ap.add_argument("--neighbour-signal", action="store_true", help="add the neighbour signal of valid and train")
    ap.add_argument("--samples", type=int, default=300, help="windows per split for the neighbour signal")
    ap.add_argument("--window", type=int, default=100, help="steps per training-loss mean")
    add_out(ap, __file__)
    a = ap.parse_args()
    try:
        workdir = Path(load_recipe(a.recipe, a.overrides).workdir)
        retro_run(a.recipe, a.overrides)
        result = collect(workdir, a.window, a.samples if a.neighbour_signal else None)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    write_result(result, a.out)


if __name__ == "__main__":
    main()
