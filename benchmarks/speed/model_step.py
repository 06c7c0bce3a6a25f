r"""Training-step speed of RetroModel vs its GPT twin (same decoder), on CPU.

    python benchmarks/speed/model_step.py [--configs tiny reference] [--steps 3] [--out FILE.json]

One step = forward + backward + Adam step (torch's fused CPU Adam), fp32, dropout 0. In
the same run a plain fp32 matmul (2048^3) is timed as the machine's limit; each model's
FLOP/s is reported as a fraction of it, with the Retro/GPT step-time ratio next to the
FLOP ratio. On a shared machine timings are noisy: the matmul and one step of every model
are timed in interleaved rounds and the best of each is kept, so the ratios compare
like with like; CPU-time figures (process time) are reported next to the wall-clock ones
because they move less with other load (exact at --threads 1). --compare-before adds both
models as they were before SDPAttention (megatron-core's DotProductAttention and rotary
embedding, torch's default Adam); --compare-plain adds benchmarks/speed/plain_gpt.py, the
leanest PyTorch GPT of the same shapes, as the floor for any GPT on this machine.

The recorded results:
    python benchmarks/speed/model_step.py --configs reference --steps 4 --compare-plain \
        --out benchmarks/results/model_step_reference_vs_plain_2threads.json
    python benchmarks/speed/model_step.py --configs reference --steps 5 --compare-before \
        --out benchmarks/results/model_step_reference_2threads.json
    python benchmarks/speed/model_step.py --configs reference --steps 3 --threads 1 --compare-before \
        --out benchmarks/results/model_step_reference_1thread.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from benchmarks.common import prepare_process  # noqa: E402

MALLOC_KEPT = prepare_process()

import torch  # noqa: E402

from benchmarks.common import add_out, forward_flops, matmul_limit, model_section, write_result  # noqa: E402
from benchmarks.speed.plain_gpt import PlainGPT  # noqa: E402
from retro_toolkit.collections.retro import build_model, config_from_model_section, initialize  # noqa: E402


class Stepper:
    """One model, its optimizer and fixed inputs; step() returns one training step's seconds."""

    def __init__(self, section: dict, arch: str, batch: int, core_attention: str, fused_adam: bool):
        torch.manual_seed(0)
        if arch == "plain_gpt":
            self.model = PlainGPT(section).train()
        else:
            cfg, args = config_from_model_section({**section, "arch": arch}, core_attention=core_attention)
            self.model = build_model(cfg, args).train()
        self.opt = make_optimizer(self.model, fused_adam)
        n, m, vocab = section["seq_length"], section["chunk_length"], section["vocab_size"]
        k, r = section["num_neighbors"], section["num_retrieved_chunks"] * m
        self.tokens = torch.randint(0, vocab, (batch, n))
        self.neighbors = torch.randint(0, vocab, (batch, n // m, k, r)) if arch == "retro" else None

    def step(self) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process) of one training step."""
        t, c = time.perf_counter(), time.process_time()
        self.opt.zero_grad(set_to_none=True)
        loss = self.model(self.tokens, self.neighbors, labels=self.tokens).mean()
        loss.backward()
        self.opt.step()
        return time.perf_counter() - t, time.process_time() - c


def make_optimizer(model: torch.nn.Module, fused: bool) -> torch.optim.Optimizer:
    if fused:
        try:
            return torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.Adam(model.parameters(), lr=1e-4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["tiny", "reference"], choices=["tiny", "reference"])
    ap.add_argument("--steps", type=int, default=3, help="timed rounds (after one warm-up round)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--core-attention", default="sdpa", choices=["sdpa", "unfused"])
    ap.add_argument(
        "--compare-before",
        action="store_true",
        help="also time both models as they were before SDPAttention: megatron-core's DotProductAttention and "
        "rotary embedding, torch's default Adam (rows gpt_before, retro_before)",
    )
    ap.add_argument(
        "--compare-plain",
        action="store_true",
        help="also time benchmarks/speed/plain_gpt.py, the leanest PyTorch GPT of the same shapes (row plain_gpt): "
        "what any GPT of this config reaches on this machine",
    )
    ap.add_argument("--no-fused-adam", action="store_true", help="torch's foreach Adam instead of the fused one")
    add_out(ap, __file__)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    initialize(1, seed=1)
    fused = not a.no_fused_adam
    result = {
        "threads": a.threads,
        "batch": a.batch,
        "core_attention": a.core_attention,
        "fused_adam": fused,
        "malloc_keeps_freed_memory": MALLOC_KEPT,
        "timing": "best of the timed rounds; each round times the matmul and one step of every model, interleaved",
        "configs": {},
    }
    limits: list[float] = []
    for name in a.configs:
        s = model_section(name)
        variants = {"gpt": ("gpt", a.core_attention, fused), "retro": ("retro", a.core_attention, fused)}
        if a.compare_before:
            variants.update(gpt_before=("gpt", "unfused", False), retro_before=("retro", "unfused", False))
        if a.compare_plain:
            variants["plain_gpt"] = ("plain_gpt", "sdpa", fused)
        steppers = {key: Stepper(s, arch, a.batch, attn, fa) for key, (arch, attn, fa) in variants.items()}
        times: dict[str, list[float]] = {key: [] for key in steppers}
        cpu_times: dict[str, list[float]] = {key: [] for key in steppers}
        config_limits, cpu_limits = [], []
        for round_ in range(a.steps + 1):  # round 0 warms up allocators and caches
            wall_limit, cpu_limit = matmul_limit(reps=3)
            config_limits.append(wall_limit)
            cpu_limits.append(cpu_limit)
            for key, st in steppers.items():
                dt, dc = st.step()
                if round_:
                    times[key].append(dt)
                    cpu_times[key].append(dc)
        limit = max(config_limits)  # the machine's best: contention only ever lowers it
        cpu_limit = max(cpu_limits)
        limits.append(limit)
        row: dict = {"matmul_2048_flops_per_s": limit, "matmul_2048_flops_per_cpu_s": cpu_limit}
        for key, (arch, attn, fa) in variants.items():
            step = min(times[key])  # best of: other work on a shared box only ever adds time
            flops = 3 * forward_flops(s, arch == "retro", a.batch)  # plain_gpt has the twin's FLOPs
            row[key] = {
                "core_attention": attn,
                "fused_adam": fa,
                "step_s": step,
                "step_median_s": statistics.median(times[key]),
                "step_times_s": times[key],
                "flops_per_step": flops,
                "fraction_of_matmul_limit": flops / step / limit,
                # CPU seconds (all threads) against the matmul's FLOP per CPU second: much less
                # sensitive to other processes on the box than wall time (exact at --threads 1).
                "step_cpu_s": min(cpu_times[key]),
                "fraction_of_matmul_limit_cpu": flops / min(cpu_times[key]) / cpu_limit,
            }
        row["retro_gpt_step_ratio"] = row["retro"]["step_s"] / row["gpt"]["step_s"]
        row["retro_gpt_flop_ratio"] = row["retro"]["flops_per_step"] / row["gpt"]["flops_per_step"]
        row["step_ratio_over_flop_ratio"] = row["retro_gpt_step_ratio"] / row["retro_gpt_flop_ratio"]
        row["retro_gpt_cpu_ratio"] = row["retro"]["step_cpu_s"] / row["gpt"]["step_cpu_s"]
        if a.compare_before:
            row["before_retro_gpt_step_ratio"] = row["retro_before"]["step_s"] / row["gpt_before"]["step_s"]
            row["before_retro_gpt_cpu_ratio"] = row["retro_before"]["step_cpu_s"] / row["gpt_before"]["step_cpu_s"]
        result["configs"][name] = row
        line = (
            f"{name}: matmul {limit / 1e9:.0f} GFLOP/s; gpt {row['gpt']['step_s']:.3f}s "
            f"({row['gpt']['fraction_of_matmul_limit']:.0%} of matmul), retro {row['retro']['step_s']:.3f}s "
            f"({row['retro']['fraction_of_matmul_limit']:.0%}), step ratio {row['retro_gpt_step_ratio']:.2f} "
            f"vs FLOP ratio {row['retro_gpt_flop_ratio']:.2f}; CPU time: "
            f"gpt {row['gpt']['fraction_of_matmul_limit_cpu']:.0%}, "
            f"retro {row['retro']['fraction_of_matmul_limit_cpu']:.0%}, ratio {row['retro_gpt_cpu_ratio']:.2f}"
        )
        if a.compare_before:
            line += (
                f"; before: gpt {row['gpt_before']['fraction_of_matmul_limit']:.0%}, "
                f"retro {row['retro_before']['fraction_of_matmul_limit']:.0%}, "
                f"ratio {row['before_retro_gpt_step_ratio']:.2f}; CPU time: "
                f"gpt {row['gpt_before']['fraction_of_matmul_limit_cpu']:.0%}, "
                f"retro {row['retro_before']['fraction_of_matmul_limit_cpu']:.0%}, "
                f"ratio {row['before_retro_gpt_cpu_ratio']:.2f}"
            )
        if a.compare_plain:
            row["gpt_over_plain_step_ratio"] = row["gpt"]["step_s"] / row["plain_gpt"]["step_s"]
            line += (
                f"; plain PyTorch GPT {row['plain_gpt']['fraction_of_matmul_limit']:.0%} "
                f"(CPU time {row['plain_gpt']['fraction_of_matmul_limit_cpu']:.0%})"
            )
        print(line, flush=True)
        del steppers
    result["matmul_2048_flops_per_s"] = max(limits)
    if a.threads == 1:
        result["note"] = "one thread: CPU-time fractions are exact and insensitive to other load"
    write_result(result, a.out)


if __name__ == "__main__":
    main()
