r"""Full training step (pretrain's loop) against the bare model step, Retro vs its GPT twin, on CPU.

    python benchmarks/speed/train.py --workdir runs/smoke [--config reference] [--steps 6] [--out FILE.json]

The work directory must have finished build_db (its corpus and neighbours feed the
batches; `retro-run recipes/smoke.yaml` makes one). One full step is what the pretrain
stage runs per iteration: sample lookup and neighbour-token gathering, megatron-core DDP
(weight gradients accumulated in its buffer: collections/retro/wgrad.py), its optimizer
with grad clipping, the LR schedule, loss all-reduce and the metrics row. Both run with
glibc keeping freed memory, as the training stages do (core/malloc.py).
The bare step is benchmarks/speed/model_step.py's: forward + backward + torch's fused Adam
on fixed tensors. Both use the same model config and batch; a plain fp32 matmul (2048^3) is
timed in the same rounds as the machine's limit. Reported per model: tokens/s, model
FLOP/s as a fraction of the matmul, and full/bare step-time ratio (goal: within 10%).

The recorded result, on a work directory of `retro-run recipes/smoke.yaml workdir=/tmp/smoke1`:
    python benchmarks/speed/train.py --workdir /tmp/smoke1 --config reference --steps 8 --compare-unfused \
        --out benchmarks/results/train_reference_2threads.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from benchmarks.common import prepare_process  # noqa: E402

MALLOC_KEPT = prepare_process()

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from benchmarks.common import add_out, forward_flops, matmul_limit, model_section, write_result  # noqa: E402
from benchmarks.speed.model_step import Stepper  # noqa: E402
from retro_toolkit.collections.retro import training  # noqa: E402
from retro_toolkit.collections.retro.config import config_from_model_section  # noqa: E402
from retro_toolkit.collections.retro.model import build_model  # noqa: E402
from retro_toolkit.collections.retro.parallel import initialize  # noqa: E402
from retro_toolkit.collections.retro.engine import dataset  # noqa: E402
from retro_toolkit.recipe import load_recipe  # noqa: E402


class FullStep:
    """The pretrain stage's iteration, one at a time."""

    def __init__(self, recipe, section: dict, arch: str, batch: int, steps: int, wgrad_fusion: bool = True):
        torch.manual_seed(0)
        overrides = {**training.precision_overrides(False, False), "gradient_accumulation_fusion": wgrad_fusion}
        cfg, args = config_from_model_section({**section, "arch": arch}, neighbor_pad_id=0, **overrides)
        self.model = build_model(cfg, args).train()
        p = OmegaConf.merge(recipe.pretrain, {"micro_batch_size": batch, "global_batch_size": batch,
                                              "train_iters": steps + 1, "lr_warmup_iters": 0, "tensorboard": False})
        self.ddp, self.opt, self.sched = training.wrap_and_optimizer(self.model, p, cfg)
        r = OmegaConf.merge(recipe, {"model": {k: section[k] for k in ("seq_length",)}})
        data = dataset(r, "train", arch, (steps + 1) * batch)
        self.batches = training.Batches(data, batch, batch, 0, 1)
        self.metrics = training.MetricsLog(Path(tempfile.mkdtemp()), f"bench_{arch}", 0, False, True)
        self.seq, self.steps, self.it = section["seq_length"], steps + 1, 0

    def step(self) -> float:
        t = time.perf_counter()
        training.train(self.ddp, self.opt, self.sched, self.batches, self.it, self.it + 1, self.seq, self.metrics,
                       lambda _: None, log_interval=1)
        self.it += 1
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=REPO / "runs" / "smoke")
    ap.add_argument("--config", default="reference", choices=["tiny", "reference"])
    ap.add_argument("--steps", type=int, default=6, help="timed rounds (after one warm-up round)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compare-unfused", action="store_true",
                    help="also time the full step with weight gradients added to the DDP buffer by a hook "
                    "(gradient_accumulation_fusion off, as before wgrad.py): rows full_unfused")
    add_out(ap, __file__)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    recipe = load_recipe(str(a.workdir / "recipe.resolved.yaml"))
    section = model_section(a.config)
    initialize(1, seed=1)
    models = {}
    for arch in ("gpt", "retro"):
        models[f"{arch}_bare"] = Stepper(section, arch, a.batch, "sdpa", True)
        models[f"{arch}_full"] = FullStep(recipe, section, arch, a.batch, a.steps)
        if a.compare_unfused:
            models[f"{arch}_full_unfused"] = FullStep(recipe, section, arch, a.batch, a.steps, wgrad_fusion=False)
    times: dict[str, list[float]] = {k: [] for k in models}
    limits = []
    for round_ in range(a.steps + 1):
        limits.append(matmul_limit(reps=3)[0])
        for key, m in models.items():
            dt = m.step()
            if isinstance(dt, tuple):
                dt = dt[0]
            if round_:
                times[key].append(dt)
    limit = max(limits)
    tokens = a.batch * section["seq_length"]
    result = {"config": a.config, "threads": a.threads, "batch": a.batch, "workdir": str(a.workdir),
              "matmul_2048_flops_per_s": limit,
              "malloc_keeps_freed_memory": MALLOC_KEPT, "timing": "best of the timed rounds, interleaved", "models": {}}
    for arch in ("gpt", "retro"):
        flops = 3 * forward_flops(section, arch == "retro", a.batch)
        row = {}
        for kind in ("bare", "full") + (("full_unfused",) if a.compare_unfused else ()):
            step = min(times[f"{arch}_{kind}"])
            row[kind] = {"step_s": step, "step_times_s": times[f"{arch}_{kind}"], "tokens_per_s": tokens / step,
                         "flops_per_step": flops, "fraction_of_matmul_limit": flops / step / limit}
        row["full_over_bare"] = row["full"]["step_s"] / row["bare"]["step_s"]
        if a.compare_unfused:
            row["full_unfused_over_bare"] = row["full_unfused"]["step_s"] / row["bare"]["step_s"]
        result["models"][arch] = row
        print(f"{arch}: full {row['full']['step_s']:.3f}s ({row['full']['tokens_per_s']:,.0f} tok/s, "
              f"{row['full']['fraction_of_matmul_limit']:.0%} of matmul) vs bare {row['bare']['step_s']:.3f}s "
              f"({row['bare']['fraction_of_matmul_limit']:.0%}): full/bare {row['full_over_bare']:.3f}", flush=True)
    result["retro_gpt_full_step_ratio"] = (result["models"]["retro"]["full"]["step_s"]
                                           / result["models"]["gpt"]["full"]["step_s"])
    write_result(result, a.out)


if __name__ == "__main__":
    main()
