"""`retro-run status WORKDIR`: each stage's Slurm job state, manifest and log, in one table.

Works from the work directory alone: the resolved recipe names the stages,
`slurm_jobs.json` the jobs a detached run queued, `stages/*.json` what finished, and
`logs/<stage>.rank0.log` what each stage printed. For a stage of several processes,
`logs/<stage>.ranks.json` (written by rank 0 at the stage's start) places each rank on its
node, and a second table shows each node's Slurm state, its ranks and their logs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from retro_toolkit.errors import UserError
from retro_toolkit.launch import log_file, ranks_path
from retro_toolkit.runner import manifest
from retro_toolkit.runner.run import RESOLVED
from retro_toolkit.runner.slurm_jobs import ACTIVE_STATES, job_states, recorded_jobs
from retro_toolkit.stages import STAGES


def _load(workdir: Path):
    from retro_toolkit.recipe import load_recipe

    resolved = workdir / RESOLVED
    if not resolved.is_file():
        raise UserError(f"{workdir} has no {RESOLVED}: it is not a work directory retro-run has run or "
                        "submitted a recipe in (give the recipe's workdir).")
    return load_recipe(str(resolved))


def _sbatch_log(exp_dir: str | None, stage: str, job_id: str) -> Path | None:
    """NeMo-Run's sbatch output file of a job (what Slurm printed before our log existed)."""
    if not exp_dir:
        return None
    hits = sorted(Path(exp_dir).glob(f"{stage}/sbatch_*_{job_id}.out"))
    return hits[0] if hits else None


def table(workdir: Path) -> tuple[list[dict[str, str]], dict]:
    recipe = _load(workdir)
    submitted = recorded_jobs(workdir)
    jobs = submitted.get("jobs", {})
    states = job_states([j["job_id"] for j in jobs.values()]) if jobs else {}
    rows = []
    for stage in (s for s in STAGES if s in recipe.stages):
        job = jobs.get(stage, {}).get("job_id", "")
        st = states.get(job, {}) if job else {}
        state = st.get("state", "UNKNOWN" if job else "-")
        if st.get("reason") and state == "PENDING":
            state = f"PENDING ({st['reason']})"
        done, why = manifest.status(recipe, stage)
        log = log_file(workdir, stage, 0)
        if not log.exists() and job:
            log = _sbatch_log(submitted.get("experiment_dir"), stage, job) or log
        rows.append({"stage": stage, "job": job or "-", "state": state, "elapsed": st.get("elapsed", "") or "-",
                     "manifest": "done" if done else why, "log": str(log) if log.exists() else "-"})
    return rows, submitted


def print_table(workdir: Path, rows: list[dict[str, str]], submitted: dict) -> None:
    head = f"work directory {workdir}"
    if submitted:
        head += f": Slurm jobs submitted {submitted.get('submitted', '?')}"
    print(head)
    print(f"{'stage':<15} {'job':<8} {'state':<28} {'elapsed':<10} {'manifest':<22} log")
    for r in rows:
        manifest_text = r["manifest"] if len(r["manifest"]) <= 22 else r["manifest"][:19] + "..."
        print(f"{r['stage']:<15} {r['job']:<8} {r['state']:<28} {r['elapsed']:<10} {manifest_text:<22} {r['log']}")
    sys.stdout.flush()


def _active(rows: list[dict[str, str]]) -> bool:
    return any(r["state"].split(" ")[0] in ACTIVE_STATES for r in rows if r["job"] != "-")


def status(workdir: str, wait: bool = False, timeout_s: float | None = None, poll_s: float = 5.0) -> int:
    """Print the table; with wait, poll until no job is queued or running. Exit code: 0, or
    with wait 1 when a submitted job did not end COMPLETED."""
    w = Path(workdir).resolve()
    rows, submitted = table(w)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while wait and _active(rows):
        if deadline is not None and time.monotonic() > deadline:
            print_table(w, rows, submitted)
            print(f"\nstill running after {timeout_s:.0f}s.", flush=True)
            return 1
        time.sleep(poll_s)
        rows, submitted = table(w)
    print_table(w, rows, submitted)
    for r in rows:
        print_ranks(w, r["stage"])
    for r in rows:
        if r["state"].startswith(("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")):
            print(f"\n{r['stage']}: {_failure(w, r['stage'], r['log'])}", flush=True)
    if wait and any(r["state"] != "COMPLETED" for r in rows if r["job"] != "-"):
        failed = [r for r in rows if r["job"] != "-" and r["state"] != "COMPLETED"]
        print(f"\nnot completed: {', '.join(r['stage'] + ' ' + r['state'] for r in failed)}", flush=True)
        return 1
    return 0


def _failure(workdir: Path, stage: str, log: str) -> str:
    """Why a stage's job failed: its recorded error, else the last line of its log."""
    from retro_toolkit.core import files
    from retro_toolkit.launch import error_path

    try:
        return "error: " + files.read_json(error_path(workdir, stage))["message"]
    except (OSError, ValueError, KeyError):
        pass
    last = _last_line(Path(log))
    if last is None:
        return "no log was written (see NeMo-Run's sbatch output under logs/experiments)"
    return f"{last or 'empty log'} (log: {log})"


def rank_rows(workdir: Path, stage: str) -> tuple[dict, list[dict[str, str]]]:
    """({started, world_size}, a row per rank: node, the node's Slurm state, rank, log, the
    log's last line) for a stage of several processes; ({}, []) otherwise."""
    from retro_toolkit.core import files

    try:
        placed = files.read_json(ranks_path(workdir, stage))
    except (OSError, ValueError):
        return {}, []
    if placed.get("world_size", 1) < 2:
        return {}, []
    states = _node_states(sorted({r["node"] for r in placed["ranks"]}))
    rows = []
    for r in sorted(placed["ranks"], key=lambda r: (r["node"], r["rank"])):
        log = log_file(workdir, stage, r["rank"])
        rows.append({"node": r["node"], "state": states.get(r["node"], "-"), "rank": str(r["rank"]),
                     "log": str(log), "last": _describe_last(log)})
    return placed, rows


def print_ranks(workdir: Path, stage: str) -> None:
    placed, rows = rank_rows(workdir, stage)
    if not rows:
        return
    nodes = len({r["node"] for r in rows})
    print(f"\n{stage}: {placed['world_size']} ranks on {nodes} node(s), started {placed.get('started', '?')}")
    print(f"  {'node':<16} {'node state':<12} {'rank':<5} {'log':<48} last line")
    for r in rows:
        print(f"  {r['node']:<16} {r['state']:<12} {r['rank']:<5} {r['log']:<48} {r['last'][:70]}")
    sys.stdout.flush()


def _node_states(names: list[str]) -> dict[str, str]:
    """Slurm's state of each node (sinfo), where this machine can ask; {} elsewhere."""
    from retro_toolkit.runner.slurm_nodes import nodes

    found = nodes(names=",".join(names)) if names else None
    return {n.name: n.state for n in found or []}


def _describe_last(log: Path) -> str:
    last = _last_line(log)
    return "(no log)" if last is None else (last or "(empty)")


def _last_line(log: Path) -> str | None:
    """The last non-blank line of a log ("" when it has none), None when it cannot be read."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            lines = [x.strip() for x in f.read().decode(errors="replace").splitlines() if x.strip()]
    except OSError:
        return None
    return lines[-1] if lines else ""
