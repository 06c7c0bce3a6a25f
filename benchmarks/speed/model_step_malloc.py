r"""Training-step speed with glibc keeping freed memory (what the model stages do) against
glibc's default allocator, at one config of benchmarks/speed/model_step.py, on CPU.

    python benchmarks/speed/model_step_malloc.py [--config reference] [--steps 3] [--processes 4] [--out FILE.json]

glibc's allocator settings are per process and must be set before torch allocates, so the
two cannot be timed in one process: model_step.py runs in --processes fresh processes, one
after the other, alternating RETRO_TOOLKIT_MALLOC=keep and default (keep first), so a change
in the machine's load shows up between neighbouring runs rather than as a difference
between the settings. Every process's row is kept ("runs"); "summary" lists each model's
best step time per setting, one number per process.

The recorded result:
    python benchmarks/speed/model_step_malloc.py --config reference --steps 3 --processes 4 \
        --out benchmarks/results/model_step_malloc_keep_vs_default.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from benchmarks.common import add_out, write_result  # noqa: E402

MODEL_STEP = Path(__file__).resolve().parent / "model_step.py"
SETTINGS = ("keep", "default")
MODELS = ("gpt", "retro")


def one_process(setting: str, config: str, steps: int, threads: int, out: Path) -> dict:
    """model_step.py's result for `config`, in a fresh process with RETRO_TOOLKIT_MALLOC=setting."""
    env = {**os.environ, "RETRO_TOOLKIT_MALLOC": setting}
    cmd = [sys.executable, str(MODEL_STEP), "--configs", config, "--steps", str(steps), "--threads", str(threads),
           "--out", str(out)]
    subprocess.run(cmd, env=env, cwd=REPO, check=True)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="reference", choices=["tiny", "reference"])
    ap.add_argument("--steps", type=int, default=3, help="timed rounds per process (after one warm-up round)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--processes", type=int, default=4, help="processes in all, alternating the two settings")
    add_out(ap, __file__)
    a = ap.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="model_step_malloc_") as tmp:
        for i in range(a.processes):
            setting = SETTINGS[i % 2]
            r = one_process(setting, a.config, a.steps, a.threads, Path(tmp) / f"{i}.json")
            runs.append({"order": i + 1, "malloc": setting, "malloc_keeps_freed_memory": r["malloc_keeps_freed_memory"],
                         **r["configs"][a.config]})
    summary = {s: {m: [run[m]["step_s"] for run in runs if run["malloc"] == s] for m in MODELS} for s in SETTINGS}
    for s, row in summary.items():
        print(f"{s}: " + "; ".join(f"{m} " + ", ".join(f"{t:.3f}s" for t in row[m]) for m in MODELS), flush=True)
    write_result({"config": a.config, "threads": a.threads, "steps": a.steps, "processes": a.processes,
                  "summary": summary, "runs": runs}, a.out)


if __name__ == "__main__":
    main()
