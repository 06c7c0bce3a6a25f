"""`retro-run [run] RECIPE [key=value ...] [--stages a,b] [--force STAGE] [--dry-run] [--detach]`:
run a recipe's stages (the default command)."""

from __future__ import annotations

import argparse

from retro_toolkit.cli.recipe_args import load, recipe_command
from retro_toolkit.stages import STAGES

NAME = "run"
# Also the epilog of `retro-run --help`.
EPILOG = "stages, in pipeline order:\n" + "".join(f"  {s.name:<15} {s.summary}\n" for s in STAGES.values()) + """
overrides:
  a.b=value       set one key (YAML value: 3, 0.5, null, [1,2], {k: v})
  group=name      swap a yaml/<group>/<name>.yaml piece, e.g. executor=slurm, model=retro_tiny

examples:
  retro-run recipes/smoke.yaml
  retro-run recipes/smoke.yaml tokenizer.vocab_size=2000 workdir=/tmp/smoke
  retro-run recipes/smoke.yaml executor=torchrun executor.nproc_per_node=2
  retro-run recipes/smoke.yaml executor=slurm executor.account=abc --dry-run
  retro-run recipes/instructretro_48b.yaml executor.account=abc executor.partition=gpu --detach
  retro-run status runs/instructretro_48b --wait
  retro-run show recipes/smoke.yaml model=retro_tiny

A finished stage is skipped on the next run unless its settings (or an upstream
stage's) changed. SIGTERM, SIGINT or SIGHUP stop every process of the run (training
saves a checkpoint first); the same command continues. Exit codes: 0 ok, 1 a stage
failed, 2 bad input, 75 a training stage stopped at its exit_duration_minutes,
128+N stopped by signal N (130 SIGINT, 143 SIGTERM).
"""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    r = recipe_command(sub, NAME, help="run a recipe's stages (the default command)", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    flags = {
        "--stages": dict(help="comma-separated stages to run, plus any unfinished stage they need"),
        "--force": dict(action="append", default=[], metavar="STAGE",
                        help="rerun STAGE even if it is up to date (repeatable)"),
        "--dry-run": dict(action="store_true", help="print the plan (and sbatch scripts for Slurm); run and write nothing"),
        "--detach": dict(action="store_true", help="Slurm: queue every stage as a job chained with afterok, record the "
                         "job ids in WORKDIR/slurm_jobs.json and return; follow with retro-run status WORKDIR"),
    }
    for flag, kwargs in flags.items():
        r.add_argument(flag, **kwargs)
    return r


def _split_stages(text: str | None) -> list[str] | None:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def run(args: argparse.Namespace) -> int:
    recipe = load(args)
    from retro_toolkit.runner.run import execute

    return execute(recipe, only=_split_stages(args.stages), force=args.force, dry=args.dry_run, detach=args.detach)
