"""The training loop on megatron-core parts: DDP wrapper, optimizer, LR schedule.

Batches are a pure function of (iteration, data-parallel rank): iteration i reads
samples [i * global_batch, (i + 1) * global_batch) of the dataset, so a resumed run
sees exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as td
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from retro_toolkit.collections.retro import wgrad
from retro_toolkit.core import signals
from retro_toolkit.errors import StageStopped, UserError


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def precision_overrides(bf16: bool, recompute: bool) -> dict[str, Any]:
    """TransformerConfig fields of a model that trains under `wrap_and_optimizer`: the section's
    bf16 and recompute_activations, and weight gradients accumulated in the DDP buffer (wgrad).

    bf16 is megatron-core's mixed precision on any device: bf16 weights and activations, fp32
    main grads (the DDP buffer) and fp32 main weights in the optimizer. CPUs compute bf16 too
    (slowly), which is how the path is tested without a GPU.
    """
    wgrad.install()
    out: dict[str, Any] = {"gradient_accumulation_fusion": True}
    if bf16:
        out.update(bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16)
    if recompute:
        out.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return out


def data_parallel() -> tuple[int, int]:
    """(rank, size) of this process among the data-parallel replicas."""
    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def grad_accumulation(global_batch: int, micro_batch: int, dp_size: int) -> int:
    if global_batch % (micro_batch * dp_size):
        raise UserError(
            f"pretrain.global_batch_size ({global_batch}) must be a multiple of pretrain.micro_batch_size "
            f"({micro_batch}) x data-parallel ranks ({dp_size}) = {micro_batch * dp_size}."
        )
    return global_batch // (micro_batch * dp_size)


def param_group_overrides(p) -> dict | None:
    """megatron-core's per-parameter overrides: its standard ones (no weight decay on biases and
    norms), plus `retrieval_lr_mult` times the learning rates for cross-attention + encoder."""
    mult = p.get("retrieval_lr_mult", 1.0)
    if mult == 1.0:
        return None  # megatron-core's defaults, exactly as before the option existed
    from megatron.core.optimizer import get_standard_config_overrides
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

    from retro_toolkit.collections.retro.checkpointing import is_retrieval_param

    overrides = get_standard_config_overrides(OptimizerConfig(lr=p.lr, min_lr=p.min_lr))
    retrieval = ParamWithNamePredicate(name="retrieval", fn=lambda param, name: is_retrieval_param(name))
    overrides[ParamKey(with_name_predicate=retrieval)] = {"max_lr": p.lr * mult, "min_lr": p.min_lr * mult}
    return overrides


def wrap_and_optimizer(model, p, config) -> tuple[DistributedDataParallel, Any, OptimizerParamScheduler]:
    """megatron-core DDP around the model, its optimizer and the LR schedule, from a pretrain section."""
    cuda = torch.cuda.is_available()
    _, dp_size = data_parallel()
    use_dist = p.use_distributed_optimizer
    if use_dist is None:
        use_dist = cuda and dp_size > 1
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                      use_distributed_optimizer=use_dist),
        model,
    )
    opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=p.lr, min_lr=p.min_lr, weight_decay=p.weight_decay, adam_beta1=p.adam_beta1,
            adam_beta2=p.adam_beta2, adam_eps=p.adam_eps, clip_grad=p.clip_grad, bf16=bool(p.bf16),
            params_dtype=config.params_dtype, use_distributed_optimizer=use_dist,
        ),
        [ddp],
        config_overrides=param_group_overrides(p),
    )
    _use_fused_adam(opt)
    sched = OptimizerParamScheduler(
        # Warmup ramps lr/W, 2lr/W, ..., lr: the first iteration already learns.
        opt, init_lr=p.lr / p.lr_warmup_iters if p.lr_warmup_iters else p.lr, max_lr=p.lr, min_lr=p.min_lr,
        lr_warmup_steps=p.lr_warmup_iters, lr_decay_steps=p.lr_decay_iters or p.train_iters,
        lr_decay_style=p.lr_decay_style, start_wd=p.weight_decay, end_wd=p.weight_decay,
        wd_incr_steps=p.train_iters, wd_incr_style="constant",
    )
    return ddp, opt, sched


def _use_fused_adam(opt) -> None:
    """Switch megatron-core's torch AdamW fallback (used without TE/apex) to torch's fused kernel.

    get_megatron_optimizer builds torch.optim.AdamW with its default multi-tensor path when
    neither Transformer Engine nor apex is installed; the fused kernel does the same update
    in one pass over each tensor (on CPU about 3x less optimizer time per step).
    """
    inner = [c.optimizer for c in getattr(opt, "chained_optimizers", [opt])]
    for o in inner:
        if type(o) in (torch.optim.AdamW, torch.optim.Adam):
            o.defaults.update(fused=True, foreach=False)
            for group in o.param_groups:
                group.update(fused=True, foreach=False)


def collate(samples: list[dict[str, np.ndarray]], dev: torch.device) -> dict[str, torch.Tensor]:
    out = {k: torch.from_numpy(np.stack([s[k] for s in samples])).to(dev) for k in ("tokens", "labels")}
    for key in ("neighbor_tokens", "loss_mask"):
        if key in samples[0]:
            out[key] = torch.from_numpy(np.stack([s[key] for s in samples])).to(dev)
    return out


@dataclass
class Batches:
    """The micro-batches one data-parallel rank computes at each iteration."""

    dataset: Any
    global_batch: int
    micro_batch: int
    dp_rank: int
    dp_size: int

    @property
    def accumulation(self) -> int:
        return grad_accumulation(self.global_batch, self.micro_batch, self.dp_size)

    def at(self, iteration: int, dev: torch.device) -> Iterator[dict[str, torch.Tensor]]:
        base = iteration * self.global_batch
        for j in range(self.accumulation):
            start = base + (j * self.dp_size + self.dp_rank) * self.micro_batch
            yield collate([self.dataset[i] for i in range(start, start + self.micro_batch)], dev)


def _fmt_eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _iteration(line: str) -> float:
    """A metrics line's iteration; a line cut short by a kill counts as not written."""
    try:
        return json.loads(line)["iteration"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class MetricsLog:
    """Per-iteration scalars: <workdir>/metrics/<name>.jsonl (rank 0) and TensorBoard."""

    def __init__(self, workdir: Path, name: str, start_iteration: int, tensorboard: bool, enabled: bool):
        self.enabled = enabled
        self.path = workdir / "metrics" / f"{name}.jsonl"
        self.writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A resumed run drops the lines of iterations it recomputes.
        kept = []
        if self.path.exists():
            kept = [l for l in self.path.read_text().splitlines() if _iteration(l) <= start_iteration]
        self.path.write_text("".join(l + "\n" for l in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(workdir / "tensorboard" / name), purge_step=start_iteration + 1)

    def write(self, row: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in row.items():
                if k != "iteration" and v is not None:
                    self.writer.add_scalar(k, v, row["iteration"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def train(
    ddp: DistributedDataParallel,
    opt,
    sched: OptimizerParamScheduler,
    batches: Batches,
    start_iteration: int,
    train_iters: int,
    tokens_per_sample: int,
    metrics: MetricsLog,
    log: Callable[[str], None],
    log_interval: int,
    save: Optional[Callable[[int], None]] = None,
    save_interval: int = 0,
    exit_duration_minutes: Optional[float] = None,
) -> dict[str, float]:
    """Run iterations start_iteration+1 .. train_iters (1-based, as checkpoints count them).

    A stop signal (SIGTERM, SIGINT, SIGHUP) or `exit_duration_minutes` of process time ends the
    run early and alike on every rank: the current iteration finishes, a checkpoint is saved
    (`save`), and StageStopped is raised; rerunning resumes there.
    """
    with signals.StopRequests(exit_duration_minutes) as stop:
        return _train(ddp, opt, sched, batches, start_iteration, train_iters, tokens_per_sample, metrics, log,
                      log_interval, save, save_interval, stop)


def _train(ddp, opt, sched, batches: Batches, start_iteration: int, train_iters: int, tokens_per_sample: int,
           metrics: MetricsLog, log: Callable[[str], None], log_interval: int,
           save: Optional[Callable[[int], None]], save_interval: int, stop: signals.StopRequests) -> dict[str, float]:
    dev = device()
    ddp.train()
    dp_group = parallel_state.get_data_parallel_group()
    dp_size = batches.dp_size
    accum = batches.accumulation
    window_start, window_tokens = time.perf_counter(), 0
    run_start, done = time.perf_counter(), 0
    last: dict[str, float] = {}
    for it in range(start_iteration, train_iters):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        loss_sum = torch.zeros((), dtype=torch.float32, device=dev)
        for mb in batches.at(it, dev):
            loss = ddp(mb["tokens"], mb.get("neighbor_tokens"), labels=mb["labels"]).float()
            if "loss_mask" in mb:  # instruction tuning: the mean over the answer tokens only
                loss = (loss * mb["loss_mask"]).sum() / mb["loss_mask"].sum().clamp(min=1)
            loss = loss.mean() / accum
            loss.backward()
            loss_sum += loss.detach()
        ddp.finish_grad_sync()
        lr = opt.param_groups[0]["lr"]  # the rate this step uses
        ok, grad_norm, _ = opt.step()
        sched.step(increment=1)
        if dp_size > 1:
            td.all_reduce(loss_sum, group=dp_group)
            loss_sum /= dp_size
        iteration = it + 1
        loss_value = float(loss_sum)
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at iteration {iteration}: lower pretrain.lr.")
        # grad_norm is None when clipping is off (megatron-core then skips computing it).
        row = {"iteration": iteration, "loss": loss_value, "lr": lr,
               "grad_norm": float(grad_norm) if grad_norm is not None else None}
        metrics.write(row)
        window_tokens += batches.global_batch * tokens_per_sample
        done += 1
        if iteration % log_interval == 0 or iteration == train_iters:
            dt = time.perf_counter() - window_start
            tps = window_tokens / max(dt, 1e-9)
            per_it = (time.perf_counter() - run_start) / done
            grad = f" | grad {row['grad_norm']:.3f}" if row["grad_norm"] is not None else ""
            log(f"iter {iteration}/{train_iters} | loss {loss_value:.4f} | lr {lr:.3e}{grad}"
                f" | {tps:,.0f} tok/s | {per_it:.2f} s/it | ETA {_fmt_eta(per_it * (train_iters - iteration))}")
            if metrics.writer is not None:
                metrics.writer.add_scalar("tokens_per_s", tps, iteration)
            window_start, window_tokens = time.perf_counter(), 0
        last = {**row, "seconds_per_iteration": (time.perf_counter() - run_start) / max(done, 1)}
        saved = save is not None and (iteration == train_iters or (save_interval and iteration % save_interval == 0))
        if saved:
            save(iteration)
        request = stop.agreed() if iteration < train_iters else 0
        if request:
            if save is not None and not saved:
                save(iteration)
            reason, code = signals.describe(request)
            raise StageStopped(f"stopped at iteration {iteration} of {train_iters} on {reason}"
                               + (", checkpoint saved; rerun to resume" if save is not None else ""),
                               code, stopped_at=iteration)
    return last
