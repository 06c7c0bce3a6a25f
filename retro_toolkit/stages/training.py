"""The batch, optimizer, schedule and checkpoint keys the two training stages share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from retro_toolkit.errors import UserError
from retro_toolkit.recipe.fields import STEPS, WHY_BATCH, WHY_STEPS, bounded

DecayStyle = Literal["cosine", "linear", "constant"]
# Keys a resumed run may change: how long to train and how to report, not what.
RESUME_FREE = frozenset({"train_iters", "save_interval", "log_interval", "tensorboard", "resume", "init_from",
                         "exit_duration_minutes"})
# Keys added after checkpoints existed, at the value that reproduces the old behaviour.
ADDED_KEYS: tuple[tuple[str, object], ...] = (("exit_duration_minutes", None),)


@dataclass
class TrainingConfig:
    # Optimizer steps (each over global_batch_size samples).
    train_iters: int = bounded(100, 1, STEPS, WHY_STEPS)
    # Samples per forward pass on one rank, and per optimizer step over all ranks: global =
    # micro * data-parallel ranks * gradient-accumulation steps.
    micro_batch_size: int = bounded(4, 1, 2**20, WHY_BATCH)
    global_batch_size: int = bounded(4, 1, 2**30, WHY_BATCH)
    # Peak learning rate after warmup, and the floor the decay ends at.
    lr: float = 1.0e-3
    min_lr: float = 1.0e-4
    lr_warmup_iters: int = bounded(0, 0, STEPS, WHY_STEPS)
    # "cosine", "linear" or "constant" decay from lr to min_lr over lr_decay_iters
    # (null = train_iters).
    lr_decay_style: DecayStyle = "cosine"
    lr_decay_iters: Optional[int] = bounded(None, 1, STEPS, WHY_STEPS)
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1.0e-8
    # Gradient-norm clipping (0 = off).
    clip_grad: float = 1.0
    # megatron-core's mixed precision: bf16 weights and activations, fp32 main grads and main
    # weights. On GPUs; CPUs compute bf16 too (slowly), which is how the tests run this path.
    bf16: bool = False
    # Recompute every layer's activations in the backward pass (memory for time).
    recompute_activations: bool = False
    # Shard optimizer state over data-parallel ranks (megatron-core's distributed optimizer;
    # runs on gloo too); null = on when there is a GPU and more than one data-parallel rank.
    use_distributed_optimizer: Optional[bool] = None
    # Write a checkpoint every N iterations (0 = only at the end); the last one is always written.
    save_interval: int = bounded(0, 0, STEPS, WHY_STEPS)
    # Print a progress line (and TensorBoard scalars) every N iterations.
    log_interval: int = bounded(10, 1, STEPS, WHY_STEPS)
    # Continue from the latest checkpoint of an interrupted run of this stage (same model).
    resume: bool = True
    # Stop at a checkpoint once the stage's processes have run this long (set it a little under
    # a job's time limit); the rerun resumes. SIGTERM, SIGINT or SIGHUP do the same at any time.
    exit_duration_minutes: Optional[float] = None
    # TensorBoard event files under <workdir>/tensorboard/.
    tensorboard: bool = True


def check_training(p: dict[str, Any], sec: str) -> None:
    """The optimizer, schedule and batch keys of section `sec` (pretrain or sft)."""
    for key in ("weight_decay", "clip_grad", "min_lr"):
        if p[key] < 0:
            raise UserError(f"recipe key '{sec}.{key}' must not be negative (got {p[key]}).")
    if p["global_batch_size"] % p["micro_batch_size"]:
        raise UserError(
            f"{sec}.global_batch_size ({p['global_batch_size']}) must be a multiple of "
            f"{sec}.micro_batch_size ({p['micro_batch_size']}) times the data-parallel ranks."
        )
    if p["min_lr"] > p["lr"]:
        raise UserError(f"{sec}.min_lr ({p['min_lr']}) is above {sec}.lr ({p['lr']}).")
    decay = p["lr_decay_iters"] or p["train_iters"]
    if p["lr_warmup_iters"] >= decay:
        raise UserError(
            f"{sec}.lr_warmup_iters ({p['lr_warmup_iters']}) must be below the decay length "
            f"({decay}: {sec}.lr_decay_iters, or {sec}.train_iters when that is null)."
        )

