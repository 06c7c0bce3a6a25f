"""Training the tiny Retro in this process (one process, or each rank under torchrun): what the
pretrain and sft stages do, with their pieces exposed for checks the stage logs cannot show."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# bf16 against fp32 from the same seed and batches: the largest per-step loss difference allowed.
# Measured on the tests' small database: at most 1.3e-3 (pretrain, 20 steps; sft, 10). Updates
# lost to bf16 rounding (no fp32 main weights) or gradients summed in bf16 are checked directly
# by the main-grad and main-weight facts below, not through the loss.
BF16_LOSS_TOL = 0.01


def train_in_process(recipe, tmp: Path, iters: int, overrides: dict | None = None, stage: str = "pretrain"):
    """`iters` steps of the recipe's Retro as the `stage` trains it (its batch and optimizer
    section, its bf16 and recompute keys and, for sft, its data, InstructRetro's gate 0 with
    retrieval frozen and the pretrain checkpoint as start), with extra TransformerConfig
    overrides; 4 samples a step in micro-batches of 2 over the data-parallel ranks. Returns
    (model, optimizer, per-step losses)."""
    from retro_toolkit.collections.retro import checkpointing as ckpt
    from retro_toolkit.collections.retro import engine as pt
    from retro_toolkit.collections.retro import training

    p = recipe[stage]
    overrides = {**training.precision_overrides(p.bf16, p.recompute_activations), **(overrides or {})}
    if stage == "sft":
        overrides["retrieval_gate"] = 0.0
    model, config, section = pt.build(recipe, "retro", overrides)
    workdir = Path(recipe.workdir)
    if stage == "sft":
        from retro_toolkit.collections.instruct.sft import sft_dataset
        from retro_toolkit.collections.text.tokenizer import workdir_tokenizer

        ckpt.load_model(ckpt.latest(workdir / "checkpoints" / "pretrain"), model, section, workdir)
        for n, param in model.named_parameters():
            param.requires_grad_(not ckpt.is_retrieval_param(n))
        data = sft_dataset(recipe, workdir_tokenizer(workdir), iters * 4, lambda _: None)
    else:
        data = pt.dataset(recipe, "train", "retro", iters * 4)
    ddp, opt, sched = training.wrap_and_optimizer(model, p, config)
    dp_rank, dp_size = training.data_parallel()
    batches = training.Batches(data, 4, 2, dp_rank, dp_size)
    metrics = training.MetricsLog(tmp, "run", 0, False, True)
    training.train(ddp, opt, sched, batches, 0, iters, 128, metrics, lambda _: None, 10)
    return model, opt, [json.loads(line)["loss"] for line in metrics.path.read_text().splitlines()]


def mixed_precision_facts(model, opt) -> dict[str, Any]:
    """What megatron-core's bf16 path must hold after training steps, for either optimizer."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    inner = opt.chained_optimizers[0]
    if hasattr(inner, "shard_fp32_from_float16_groups"):  # distributed: this rank's shard of each
        pairs = [(m, f) for mg, fg in zip(inner.shard_float16_groups, inner.shard_fp32_from_float16_groups)
                 for m, f in zip(mg, fg)]
    else:
        pairs = [(m, f) for mg, fg in zip(inner.float16_groups, inner.fp32_from_float16_groups) for m, f in zip(mg, fg)]
    return {
        "optimizer": type(inner).__name__,
        "param_dtypes": sorted({str(p.dtype) for p in params}),
        "main_grad_dtypes": sorted({str(p.main_grad.dtype) for p in params}),
        "main_grad_nonzero": any(bool(p.main_grad.abs().sum() > 0) for p in params),
        "main_weights": len(pairs),
        "main_weight_dtypes": sorted({str(f.dtype) for _, f in pairs}),
        # the bf16 weights are the fp32 main weights rounded
        "weights_are_rounded_main_weights": all(torch.equal(m, f.bfloat16()) for m, f in pairs),
    }


def compare_bf16_with_fp32(resolved: str, tmp: Path, stage: str, iters: int, extra: list[str] = ()) -> dict:
    """The stage's losses in fp32, and in bf16 with the weight-gradient GEMM accumulating into the
    DDP buffer (apex's kernel on GPUs, wgrad.py here) and without; the bf16 runs' facts."""
    from retro_toolkit.recipe import load_recipe

    _, _, fp32 = train_in_process(load_recipe(resolved, list(extra)), tmp / "fp32", iters, stage=stage)
    out: dict[str, Any] = {"fp32": fp32}
    for fused in (True, False):
        recipe = load_recipe(resolved, [*extra, f"{stage}.bf16=true"])
        model, opt, losses = train_in_process(recipe, tmp / f"bf16_{fused}", iters,
                                              {"gradient_accumulation_fusion": fused}, stage=stage)
        out[f"bf16_fused_{fused}"] = {"losses": losses, **mixed_precision_facts(model, opt)}
    return out


def check_bf16_result(result: dict, iters: int, optimizer: str = "Float16OptimizerWithFloat16Params") -> None:
    fp32 = result["fp32"]
    assert len(fp32) == iters and all(math.isfinite(x) for x in fp32)
    for fused in (True, False):
        run = result[f"bf16_fused_{fused}"]
        got = run["losses"]
        assert len(got) == iters and all(math.isfinite(x) for x in got), got
        assert max(abs(a - b) for a, b in zip(got, fp32)) < BF16_LOSS_TOL, (got, fp32)
        assert run["optimizer"] == optimizer
        assert run["param_dtypes"] == ["torch.bfloat16"]
        assert run["main_grad_dtypes"] == ["torch.float32"] and run["main_grad_nonzero"]
        assert run["main_weights"] > 0 and run["main_weight_dtypes"] == ["torch.float32"]
        assert run["weights_are_rounded_main_weights"]
