"""A recipe's stages as one NeMo-Run experiment of Slurm jobs chained with afterok.

`submit` queues every stage that needs to run at once, each job waiting for the jobs of
the stages it reads (`--dependency=afterok:<id>`), records the job ids in
`<workdir>/slurm_jobs.json` and returns: `retro-run status WORKDIR` follows them from
there. `sbatch_scripts` renders the same jobs without submitting (--dry-run), and
`job_states` reads their states back from sacct and squeue.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from retro_toolkit import executors
from retro_toolkit.core import files
from retro_toolkit.errors import UserError
from retro_toolkit.runner.plan import Step
from retro_toolkit.stages import STAGES

JOBS_FILE = "slurm_jobs.json"
# Slurm states of a job that has not finished yet.
ACTIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED")


def _add_jobs(exp: Any, recipe: DictConfig, steps: list[Step], recipe_file: Path, dry: bool) -> dict[str, list[str]]:
    """Add a job per stage that runs; return {stage: the stages whose jobs it waits for}."""
    added: dict[str, list[str]] = {}
    for step in (s for s in steps if s.run):
        ups = [d for d in STAGES[step.stage].upstream(recipe.stages) if d in added]
        cfg = executors.for_stage(recipe.executor, step.stage)
        ex = executors.build(cfg, recipe, waits=bool(ups), stage=step.stage)
        if dry and ups:
            # Job ids exist only once sbatch ran; show the stage each one stands for.
            ex.dependencies = [f"dryrun://nemo_run/<{d}>" for d in ups]
        exp.add(executors.script(cfg, step.stage, recipe_file), executor=ex, name=step.stage, dependencies=ups)
        added[step.stage] = ups
    return added


def sbatch_scripts(recipe: DictConfig, steps: list[Step], recipe_file: Path) -> dict[str, str]:
    """The sbatch script of every stage that would run, in order (nothing is submitted)."""
    import nemo_run as run

    # NeMo-Run writes scripts into an experiment folder: make that a throwaway one so a
    # dry run leaves nothing behind (the scripts' own paths still point at the work
    # directory, where a real run puts them).
    scratch = tempfile.mkdtemp(prefix="retro-dryrun-")
    try:
        with run.Experiment(recipe.name, base_dir=scratch, clean_mode=True) as exp:
            _add_jobs(exp, recipe, steps, recipe_file, dry=True)
            if not exp.jobs:
                return {}
            exp.dryrun(log=False, delete_exp_dir=False)
            exp_dir = Path(exp.jobs[0].executor.experiment_dir)
            return {job.id: (exp_dir / f"{job.id}_sbatch.sh").read_text() for job in exp.jobs}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _job_id(handle: str) -> str:
    # NeMo-Run's handle for a Slurm job: <scheme>://nemo_run/<job id>
    return handle.partition("://")[2].split("/")[1]


def submit(recipe: DictConfig, steps: list[Step], recipe_file: Path) -> dict[str, str]:
    """Queue the stages that need to run as dependent jobs; return {stage: job id}."""
    import nemo_run as run

    workdir = Path(recipe.workdir)
    with run.Experiment(recipe.name, base_dir=str(executors.logs_root(recipe)), clean_mode=True,
                        log_level="WARN") as exp:
        after = _add_jobs(exp, recipe, steps, recipe_file, dry=False)
        exp.run(detach=True, tail_logs=False)
        ids = {job.id: _job_id(job.handle) for job in exp.jobs}
        exp_dir = Path(exp.jobs[0].executor.experiment_dir)
    files.write_json(workdir / JOBS_FILE, {
        "recipe": recipe.name,
        "submitted": time.strftime("%Y-%m-%d %H:%M:%S"),
        "experiment_dir": str(exp_dir),
        "jobs": {stage: {"job_id": ids[stage], "after": after[stage]} for stage in ids},
    })
    return ids


def recorded_jobs(workdir: Path) -> dict[str, Any]:
    try:
        data = files.read_json(workdir / JOBS_FILE)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _hms(elapsed: str) -> str:
    """squeue's M:SS / H:MM:SS as sacct's HH:MM:SS (days, D-HH:MM:SS, stay as they are)."""
    if "-" in elapsed or not elapsed:
        return elapsed
    parts = [int(x) for x in elapsed.split(":") if x.isdigit()]
    if not parts or len(parts) != len(elapsed.split(":")):
        return elapsed
    parts = [0] * (3 - len(parts)) + parts
    return f"{parts[0]:02d}:{parts[1]:02d}:{parts[2]:02d}"


def _rows(cmd: list[str], failure: list | None = None) -> list[list[str]] | None:
    """A Slurm client command's '|'-separated output as rows of 4 fields; None when it cannot
    run, `failure` when it exits non-zero."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if p.returncode != 0:
        return failure
    return [(line.split("|") + ["", "", "", ""])[:4] for line in p.stdout.splitlines()]


def job_states(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """{job id: {state, elapsed, reason}} from sacct (finished jobs too) and squeue
    (why a job is still pending); jobs neither knows are left out."""
    out: dict[str, dict[str, str]] = {}
    if not job_ids:
        return out
    ids = ",".join(job_ids)
    acct = _rows(["sacct", "-n", "-X", "-P", "-j", ids, "-o", "JobIDRaw,State,Elapsed,ExitCode"])
    for jid, state, elapsed, code in acct or []:
        out[jid] = {"state": state.split(" ")[0], "elapsed": elapsed, "exit_code": code, "reason": ""}
    # squeue exits non-zero for ids it no longer knows: finished jobs, which sacct has.
    queue = _rows(["squeue", "-h", "-t", "all", "-j", ids, "-o", "%i|%T|%M|%r"], failure=[])
    for jid, state, elapsed, reason in queue or []:
        row = out.setdefault(jid, {"state": state, "elapsed": elapsed, "exit_code": "", "reason": ""})
        if state in ACTIVE_STATES:
            row.update(state=state, elapsed=_hms(elapsed))
        row["reason"] = "" if reason in ("None", "(null)") else reason
    if acct is None and queue is None:
        raise UserError("neither sacct nor squeue could be run here: run retro-run status on a machine "
                        "with the Slurm client commands (the login node the jobs were submitted from).")
    return out


def check_no_active_jobs(workdir: Path) -> None:
    """Refuse to start over a pipeline of this work directory that Slurm still runs."""
    jobs = recorded_jobs(workdir).get("jobs", {})
    if not jobs:
        return
    ids = {v["job_id"]: k for k, v in jobs.items()}
    try:
        states = job_states(list(ids))
    except UserError:
        return  # no Slurm client here: nothing of this work directory can be queued from here
    active = [f"{ids[j]} (job {j}, {s['state']})" for j, s in states.items() if j in ids and s["state"] in ACTIVE_STATES]
    if active:
        raise UserError(
            f"{workdir} has Slurm jobs that are still queued or running: {', '.join(active)}. "
            f"Follow them with: retro-run status {workdir}; or cancel them with scancel, then rerun."
        )
