"""A stage's job on this machine (executor local and torchrun), started by the runner itself.

The job runs in a session of its own, as a NeMo-Run job would, so a terminal's Ctrl-C
reaches the runner only; the runner's signal handling (core/signals.py) then stops the
job and every process under it. The job's own output (torchrun's messages, each rank's
lines, anything printed before a rank opened its log) goes to logs/<stage>.out, appended
run after run like the rank logs.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from omegaconf import DictConfig

from retro_toolkit.core.dist import share_cores
from retro_toolkit.executors.common import job_env, nproc_per_node


def output_file(workdir: Path | str, stage: str) -> Path:
    return Path(workdir) / "logs" / f"{stage}.out"


def run_job(cfg: DictConfig, argv: list[str], out: Path) -> str:
    """Run the job to its end; its final state, as NeMo-Run names them: SUCCEEDED or FAILED."""
    env = dict(os.environ)
    env.update({k: os.path.expandvars(v) for k, v in job_env(cfg).items()})
    if cfg.type == "torchrun":
        share_cores(env, nproc_per_node(cfg))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "ab") as f:
        f.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(argv)}\n".encode())
        f.flush()
        job = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                               start_new_session=True)
        code = job.wait()
    return "SUCCEEDED" if code == 0 else "FAILED"
