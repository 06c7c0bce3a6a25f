"""What the benchmark scripts share: result files that name the command that wrote them, the
model configs they time, the machine's matmul rate and a model's FLOPs per step.

Scripts import it as `benchmarks.common` after putting the repository root on sys.path.
Nothing here imports torch at import time: the speed scripts set glibc's allocator first.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# Read from the environment by the toolkit and changing what a benchmark measures, so a
# result's command must carry them.
ENV_KEYS = ("RETRO_TOOLKIT_MALLOC",)

REFERENCE = dict(
    vocab_size=32000,
    num_layers=12,
    hidden_size=512,
    num_attention_heads=8,
    ffn_hidden_size=2048,
    seq_length=512,
    chunk_length=64,
    num_neighbors=2,
    num_retrieved_chunks=2,
    encoder_num_layers=2,
    cca_layers=[6, 9, 12],
)
NO_DROPOUT = dict(hidden_dropout=0.0, attention_dropout=0.0, encoder_hidden_dropout=0.0, encoder_attention_dropout=0.0)


def prepare_process() -> bool:
    """What a script does before torch is imported: warnings off, and glibc's allocator set as
    the training stages set it (RETRO_TOOLKIT_MALLOC=default to compare). Returns whether
    freed memory is kept."""
    import warnings

    from retro_toolkit.core import malloc

    warnings.filterwarnings("ignore")
    return malloc.keep_freed_memory()


def command(argv: list[str] | None = None) -> str:
    """This process's command line, the script's path relative to the repository root."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    if script.is_relative_to(REPO):
        argv[0] = str(script.relative_to(REPO))
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in ENV_KEYS if k in os.environ]
    return " ".join([*env, "python", shlex.join(argv)])


def add_out(ap: argparse.ArgumentParser, script: str) -> None:
    """--out, by default benchmarks/results/<the script's name>.json."""
    default = RESULTS / f"{Path(script).stem}.json"
    ap.add_argument("--out", type=Path, default=default,
                    help=f"result file (default {default.relative_to(REPO)})")


def write_result(result: dict, out: Path, echo: bool = False) -> None:
    """The result as JSON in `out`, its command first; printed too when `echo`."""
    text = json.dumps({"command": command(), **result}, indent=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    if echo:
        print(text)
    print(f"wrote {out}", flush=True)


def model_section(name: str) -> dict:
    """The model section a speed benchmark times: "reference" or "tiny" (retro_tiny.yaml), no dropout."""
    import yaml

    if name == "reference":
        return {**REFERENCE, **NO_DROPOUT}
    section = yaml.safe_load((REPO / "yaml" / "model" / "retro_tiny.yaml").read_text())
    return {**section, "vocab_size": 8000, **NO_DROPOUT}


def matmul_limit(n: int = 2048, reps: int = 5) -> tuple[float, float]:
    """FLOP/s of the best of `reps` plain fp32 n^3 matmuls: (per wall second, per CPU second)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    wall, cpu = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return 2 * n**3 / min(wall), 2 * n**3 / min(cpu)


def forward_flops(s: dict, retro: bool, batch: int) -> float:
    """Matmul FLOPs of one forward pass (attention scores counted in full, as Megatron does)."""
    n, h, f, L, V = s["seq_length"], s["hidden_size"], s["ffn_hidden_size"], s["num_layers"], s["vocab_size"]
    mlp = (3 if s.get("swiglu") else 2) * 2 * h * f
    layer = n * (2 * h * 3 * h + 2 * h * h + mlp) + 2 * 2 * n * n * h
    total = L * layer + 2 * n * h * V
    if retro:
        m, k, r = s["chunk_length"], s["num_neighbors"], s["num_retrieved_chunks"] * s["chunk_length"]
        l = n // m
        t = l * k * r  # encoder tokens
        cca = n * 2 * h * h * 2 + t * 2 * h * 2 * h + 2 * 2 * n * k * r * h
        enc = s["encoder_num_layers"] * (t * (2 * h * 3 * h + 2 * h * h + mlp) + 2 * 2 * t * r * h)
        enc += t * 2 * h * h * 2 + n * 2 * h * 2 * h + 2 * 2 * t * m * h
        total += len(s["cca_layers"]) * cca + enc
    return batch * total


def proc_status() -> dict[str, int]:
    """This process's VmRSS, VmHWM, RssAnon and RssFile, in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


class PeakMemory:
    """`with PeakMemory(every_s) as m: ...` -> m.base (the status at entry), m.end (at exit) and
    m.peak_rss_increase (the kernel's VmHWM, reset at entry) and m.peak_anon_increase (RssAnon
    sampled every `every_s`; a memory map's file pages count in RSS, not here), in bytes."""

    def __init__(self, every_s: float = 0.002) -> None:
        import threading

        self.every_s, self.stop = every_s, threading.Event()

    def __enter__(self) -> "PeakMemory":
        import threading

        self.base = proc_status()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        self.peak_anon = self.base["RssAnon"]
        self.sampler = threading.Thread(target=self._sample, daemon=True)
        self.sampler.start()
        return self

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.peak_anon = max(self.peak_anon, proc_status()["RssAnon"])
            time.sleep(self.every_s)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.sampler.join()
        self.end = proc_status()
        self.peak_anon = max(self.peak_anon, self.end["RssAnon"])
        self.peak_rss_increase = self.end["VmHWM"] - self.base["VmRSS"]
        self.peak_anon_increase = self.peak_anon - self.base["RssAnon"]
