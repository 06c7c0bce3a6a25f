"""The one entry point every job runs, whatever the executor:

    python -m retro_toolkit.launch STAGE <workdir>/recipe.resolved.yaml

It checks that upstream stages finished, runs the stage on every rank, and (rank 0)
writes the stage manifest last, so a killed stage never looks finished.
Exit codes: 0 done, 2 bad input (message, no traceback), 1 failure.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

from retro_toolkit.core import malloc
from retro_toolkit.errors import RetroError, UserError
from retro_toolkit.executors import MODEL_PARALLEL_STAGES


def run_stage(stage: str, recipe_file: str) -> int:
    from retro_toolkit.core import cpu
    from retro_toolkit.core.lock import worker_lock
    from retro_toolkit.recipe import load_recipe
    from retro_toolkit.runner import manifest
    from retro_toolkit.stages import STAGES

    recipe = load_recipe(recipe_file)
    spec = STAGES.get(stage)
    if spec is None or spec.entry is None or stage not in recipe.stages:
        raise UserError(f"stage '{stage}' is not runnable from {recipe_file}.")
    for dep in spec.upstream(recipe.stages):
        current, why = manifest.status(recipe, dep)
        if not current:
            raise UserError(
                f"stage '{stage}' needs stage '{dep}', which is not done ({why}). "
                f"Run it first: retro-run {recipe_file} --stages {dep}"
            )

    cpu.before_megatron()
    with contextlib.ExitStack() as stack:
        if recipe.executor.type != "slurm":  # Slurm's runner checks the queue instead (core/lock.py)
            stack.enter_context(worker_lock(Path(recipe.workdir)))
        return _run(stage, recipe, spec)


def _run(stage: str, recipe, spec) -> int:
    from retro_toolkit.core import dist, files
    from retro_toolkit.core.stage import StageContext
    from retro_toolkit.executors.common import timeout_s
    from retro_toolkit.runner import manifest

    env = dist.init(timeout_s(recipe.executor, stage))
    started = time.time()
    places = dist.all_gather_object({"rank": env.rank, "node": dist.node_name(), "pid": os.getpid()})
    if env.is_main:
        files.write_json(ranks_path(recipe.workdir, stage), {"started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                             "world_size": env.world_size, "ranks": places})
    if spec.precheck:
        module, func = spec.precheck.split(":")
        getattr(importlib.import_module(module), func)(StageContext(stage, recipe, env))
    # Read before the manifest goes: a work directory from before pins existed pins its manifest's.
    keep = manifest.keeps_trained(recipe, stage)
    legacy_pin = manifest.pin(recipe, stage) if spec.update_keys and not manifest.pin_path(recipe.workdir, stage).exists() \
        else None
    dist.barrier()
    if env.is_main:
        if legacy_pin:
            files.write_json(manifest.pin_path(recipe.workdir, stage), legacy_pin)
        manifest.remove(recipe.workdir, stage)
    dist.barrier()
    module, func = spec.entry.split(":")
    fn = getattr(importlib.import_module(module), func)
    ctx = StageContext(stage, recipe, env, keep_trained=keep)
    result = fn(ctx)
    dist.barrier()
    if env.is_main:
        if spec.update_keys and not result.kept_trained:
            manifest.write_pin(recipe, stage)
        manifest.write(recipe, stage, result.outputs, result.summary, started, env.world_size)
        print(f"[{stage}] finished in {time.time() - started:.1f}s", flush=True)
    dist.shutdown()
    return 0


class _Tee:
    """Copy a stream into the stage's own log file, which the runner names on failure."""

    def __init__(self, stream, log) -> None:
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.log.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.log.flush()
        self.stream.flush()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def log_file(workdir: str | os.PathLike, stage: str, rank: int) -> Path:
    return Path(workdir) / "logs" / f"{stage}.rank{rank}.log"


def ranks_path(workdir: str | os.PathLike, stage: str) -> Path:
    """Where rank 0 records each rank's node and pid when a stage starts (`retro-run status`)."""
    return Path(workdir) / "logs" / f"{stage}.ranks.json"


def error_path(workdir: str | os.PathLike, stage: str) -> Path:
    return Path(workdir) / "stages" / f"{stage}.error.json"


def _tee_to_log(stage: str, recipe_file: str) -> None:
    from retro_toolkit.core import dist

    rank = int(os.environ.get("RANK", 0))
    path = log_file(Path(recipe_file).resolve().parent, stage, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a", encoding="utf-8", buffering=1)
    log.write(f"\n===== {stage} rank {rank} started {time.strftime('%Y-%m-%d %H:%M:%S')} on {dist.node_name()} =====\n")
    sys.stdout = _Tee(sys.stdout, log)
    sys.stderr = _Tee(sys.stderr, log)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m retro_toolkit.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage")
    p.add_argument("recipe", help="the resolved recipe (<workdir>/recipe.resolved.yaml)")
    args = p.parse_args(argv)
    if args.stage in MODEL_PARALLEL_STAGES:  # they run the model step after step; before torch allocates
        malloc.keep_freed_memory()
    _tee_to_log(args.stage, args.recipe)
    workdir = Path(args.recipe).resolve().parent
    error_file = error_path(workdir, args.stage)
    if int(os.environ.get("RANK", 0)) == 0 and error_file.exists():
        error_file.unlink()
    try:
        return run_stage(args.stage, args.recipe)
    except RetroError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        # The runner re-raises this in the user's terminal (bad input keeps exit code 2).
        from retro_toolkit.core import files

        stopped = getattr(e, "stopped_at", None)  # a training stage that saved and stopped early
        files.write_json(error_file, {"exit_code": e.exit_code, "message": str(e),
                                      **({"stopped_at": stopped} if stopped is not None else {})})
        return e.exit_code
    except Exception:
        traceback.print_exc()
        from retro_toolkit.core import dist

        dist.abandon_if_cut_off()
        return 1


if __name__ == "__main__":
    sys.exit(main())
