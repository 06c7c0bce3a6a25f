"""Run a recipe: plan, then each stage's job (on this machine, or through NeMo-Run on Slurm or
Docker), then a summary table."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from retro_toolkit import executors
from retro_toolkit.core import files
from retro_toolkit.core.lock import workdir_lock
from retro_toolkit.core.signals import Interrupted, stop_run_on_signal
from retro_toolkit.errors import StageFailed, StageStopped, UserError
from retro_toolkit.launch import error_path, log_file
from retro_toolkit.recipe import to_yaml
from retro_toolkit.executors import MODEL_PARALLEL_STAGES, describe, for_stage, processes
from retro_toolkit.runner import manifest
from retro_toolkit.runner.follow import LogFollower
from retro_toolkit.runner.local_job import output_file, run_job
from retro_toolkit.runner.plan import Step, make_plan
from retro_toolkit.runner.preflight import check_inputs, check_launch

RESOLVED = "recipe.resolved.yaml"


@dataclass
class Outcome:
    stage: str
    status: str  # done | skipped | failed | not run
    wall_s: float | None
    detail: str


def print_plan(recipe: DictConfig, steps: list[Step]) -> None:
    print(f"recipe {recipe.name}: workdir {recipe.workdir}, executor {describe(recipe.executor)}")
    per_stage = bool(recipe.executor.get("stages"))
    for s in steps:
        line = f"  {'run ' if s.run else 'skip'}  {s.stage:<15} {s.reason}"
        if per_stage and s.run:
            cfg = for_stage(recipe.executor, s.stage)
            line = f"{line:<60} {describe(cfg)}"
            if s.stage in MODEL_PARALLEL_STAGES:
                tp = recipe.model.tensor_model_parallel_size
                line += f"; TP {tp} x DP {processes(cfg) // tp}"
        print(line)
    sys.stdout.flush()


def _summary_text(summary: dict) -> str:
    text = ", ".join(f"{k}={v}" for k, v in summary.items())
    return text if len(text) <= 70 else text[:67] + "..."


def print_summary(outcomes: list[Outcome]) -> None:
    print()
    print(f"{'stage':<15} {'status':<8} {'wall':>8}  outputs")
    for o in outcomes:
        wall = f"{o.wall_s:.1f}s" if o.wall_s is not None else "-"
        print(f"{o.stage:<15} {o.status:<8} {wall:>8}  {o.detail}")
    sys.stdout.flush()


def _status_name(status: object) -> str:
    return getattr(status, "name", None) or str(status).split(" ")[0]


def _launch(recipe: DictConfig, stage: str, recipe_file: Path) -> str:
    """Run one stage's job and wait: on this machine, or as a NeMo-Run experiment (Slurm,
    Docker); return the job's final state."""
    ex_cfg = for_stage(recipe.executor, stage)
    here = executors.argv(ex_cfg, stage, recipe_file)
    if here is not None:
        return run_job(ex_cfg, here, output_file(recipe.workdir, stage))

    import nemo_run as run

    executor = executors.build(ex_cfg, recipe, stage=stage)
    with run.Experiment(
        f"{recipe.name}-{stage}", base_dir=str(executors.logs_root(recipe)), clean_mode=True, log_level="WARN"
    ) as exp:
        exp.add(executors.script(ex_cfg, stage, recipe_file), executor=executor, name=stage)
        exp.run(sequential=True, tail_logs=False)
    # Leaving the block waits for a single job; only then is its state final.
    info = exp.status(return_dict=True) or {}
    return _status_name(info.get(stage, {}).get("status", "UNKNOWN"))


def _stage_error(workdir: Path, stage: str) -> dict | None:
    try:
        return files.read_json(error_path(workdir, stage))
    except (OSError, ValueError):
        return None


def dry_run(recipe: DictConfig, steps: list[Step]) -> None:
    if recipe.executor.type != "slurm":
        print("dry run: nothing was run.")
        return
    from retro_toolkit.runner.slurm_jobs import sbatch_scripts

    resolved = Path(recipe.workdir) / RESOLVED
    for stage, text in sbatch_scripts(recipe, steps, resolved).items():
        print(f"\n# ---- sbatch script for stage {stage} ----")
        print(text)
    print("dry run: nothing was submitted.")


def execute(
    recipe: DictConfig,
    only: list[str] | None = None,
    force: list[str] | None = None,
    dry: bool = False,
    detach: bool = False,
) -> int:
    if detach and recipe.executor.type != "slurm":
        raise UserError(
            f"--detach queues the stages as Slurm jobs and returns, but executor.type is {recipe.executor.type}: "
            "use executor=slurm, or run without --detach."
        )
    steps = make_plan(recipe, only, force)
    check_inputs(recipe)
    if dry:
        print_plan(recipe, steps)
        dry_run(recipe, steps)
        return 0

    check_launch(recipe, stages=[s.stage for s in steps if s.run])
    workdir = Path(recipe.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with workdir_lock(workdir):
        if recipe.executor.type == "slurm":
            from retro_toolkit.runner.slurm_jobs import check_no_active_jobs

            check_no_active_jobs(workdir)
        steps = make_plan(recipe, only, force)  # again: another run may have finished stages meanwhile
        print_plan(recipe, steps)
        if detach:
            return _submit(recipe, steps, workdir)
        return _execute(recipe, steps, workdir)


def _submit(recipe: DictConfig, steps: list[Step], workdir: Path) -> int:
    from retro_toolkit.runner.slurm_jobs import JOBS_FILE, submit

    if not any(s.run for s in steps):
        print("\nnothing to submit: every stage is done.")
        return 0
    resolved = workdir / RESOLVED
    files.write_text(resolved, to_yaml(recipe))
    ids = submit(recipe, steps, resolved)
    print()
    for stage, job in ids.items():
        print(f"submitted {stage:<15} job {job}")
    print(f"\njob ids: {workdir / JOBS_FILE}\nfollow them: retro-run status {workdir} [--wait]", flush=True)
    return 0


def _execute(recipe: DictConfig, steps: list[Step], workdir: Path) -> int:
    resolved = workdir / RESOLVED
    files.write_text(resolved, to_yaml(recipe))
    # Local jobs (and torchrun's workers) must find this interpreter's packages.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

    outcomes: list[Outcome] = []
    failed: str | None = None
    for step in steps:
        if failed:
            outcomes.append(Outcome(step.stage, "not run", None, f"needs {failed}"))
            continue
        if not step.run:
            m = manifest.read(workdir, step.stage) or {}
            outcomes.append(Outcome(step.stage, "skipped", None, _summary_text(m.get("summary", {}))))
            continue
        print(f"\n==> {step.stage} ({step.reason})", flush=True)
        t0 = time.time()
        try:
            with LogFollower(log_file(workdir, step.stage, 0)), stop_run_on_signal():
                state = _launch(recipe, step.stage, resolved)
        except Interrupted as stop:
            outcomes.append(Outcome(step.stage, "stopped", time.time() - t0,
                                    f"{stop}; rerun to continue; log: {log_file(workdir, step.stage, 0)}"))
            outcomes += [Outcome(s.stage, "not run", None, "run stopped") for s in steps[len(outcomes):]]
            print_summary(outcomes)
            raise
        wall = time.time() - t0
        done, _ = manifest.status(recipe, step.stage)
        if state == "SUCCEEDED" and done:
            m = manifest.read(workdir, step.stage) or {}
            outcomes.append(Outcome(step.stage, "done", wall, _summary_text(m.get("summary", {}))))
        else:
            log = log_file(workdir, step.stage, 0)
            outcomes.append(Outcome(step.stage, "failed", wall, f"job {state}; log: {log}"))
            failed = step.stage
    print_summary(outcomes)
    if failed:
        err = _stage_error(workdir, failed)
        if err and err.get("exit_code") == UserError.exit_code:
            raise UserError(f"stage '{failed}': {err['message']} (log: {log_file(workdir, failed, 0)})")
        if err and err.get("stopped_at") is not None:
            raise StageStopped(f"stage '{failed}': {err['message']}", err["exit_code"])
        from retro_toolkit.runner.status import rank_rows

        placed, ranks = rank_rows(workdir, failed)
        more = (f" It ran as {placed['world_size']} ranks on {len({r['node'] for r in ranks})} node(s): "
                f"`retro-run status {workdir}` shows each node, its ranks and their logs.") if ranks else ""
        job_files = (f"the job's own output: {output_file(workdir, failed)}"
                     if executors.runs_here(for_stage(recipe.executor, failed))
                     else f"NeMo-Run's job files are under {executors.logs_root(recipe)}/experiments")
        raise StageFailed(f"stage '{failed}' failed. Its log: {log_file(workdir, failed, 0)} ({job_files}).{more}")
    return 0
