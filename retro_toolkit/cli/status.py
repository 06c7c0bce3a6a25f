"""`retro-run status WORKDIR [--wait] [--timeout SECONDS]`: a work directory stage by stage."""

from __future__ import annotations

import argparse

NAME = "status"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    st = sub.add_parser(NAME, help="stage by stage: Slurm job state, manifest, log of a work directory",
                        description="Reads WORKDIR alone: recipe.resolved.yaml for the stages, slurm_jobs.json "
                        "for the jobs a --detach run queued (states from sacct and squeue), stages/*.json "
                        "for what finished and logs/ for each stage's log.")
    st.add_argument("workdir")
    st.add_argument("--wait", action="store_true",
                    help="poll until no job is queued or running; exit 1 unless every job ended COMPLETED")
    st.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="with --wait: give up after")
    return st


def run(args: argparse.Namespace) -> int:
    from retro_toolkit.runner.status import status

    return status(args.workdir, wait=args.wait, timeout_s=args.timeout)
