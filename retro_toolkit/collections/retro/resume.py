"""Resuming a training stage: find its latest checkpoint, check that the run continues the same
training, and restore model, optimizer, scheduler and RNG states exactly."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as td
from megatron.core import dist_checkpointing

from retro_toolkit.collections.retro.checkpointing import (
    common_state,
    device_kind,
    latest,
    restore_rng,
    rng_object,
    sharded_state,
)
from retro_toolkit.core import dist
from retro_toolkit.errors import UserError


def resume_point(root: Path, resume: bool, key: str, current: dict[str, Any], is_main: bool,
                 log) -> Optional[Path]:
    """The checkpoint a stage continues from, checked against its current settings, or None.

    With resume false (`key` names that recipe key) an existing folder is deleted first.
    """
    found = latest(root)
    if found is not None and not resume:
        log(f"{key} is false: removing {root}")
        dist.barrier()
        if is_main:
            shutil.rmtree(root)
        dist.barrier()
        return None
    if found is not None:
        check_resume(found, common_state(found).get("settings", {}), current, key)
    return found


def check_resume(ckpt: Path, saved: dict[str, Any], current: dict[str, Any],
                 resume_key: str = "pretrain.resume") -> None:
    """A resumed run must continue the same training: same model, data order and optimizer settings."""
    if not saved:
        raise UserError(f"{ckpt} records no training settings (an older retro_toolkit wrote it), so a resume "
                        f"cannot be checked. Set {resume_key}=false to start over (deletes that checkpoint folder).")
    keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if keys:
        diff = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs recipe {current.get(k)!r}" for k in keys)
        raise UserError(
            f"{ckpt} was written by a run with other settings ({diff}), so resuming it would not reproduce "
            f"either run. Set {resume_key}=false to start over (deletes that checkpoint folder), or restore "
            "the settings."
        )


def load_resume(ckpt: Path, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore everything a resumed run needs; returns the checkpoint's common entries."""
    saved = common_state(ckpt)
    # RNG streams are per rank and per device kind: another world size or device starts them afresh.
    same_world = saved.get("world_size") == td.get_world_size() and saved.get("device", "cpu") == device_kind()
    with _adam_steps_kept(optimizer):
        sd = sharded_state(model, optimizer, is_loading=True)
        if same_world:
            sd["rng"] = rng_object()
        loaded = dist_checkpointing.load(sd, str(ckpt))
        model.load_state_dict(loaded.pop("model"))
        if optimizer is not None:
            with torch.no_grad():  # the distributed optimizer copies into fp32 parameters' views in place
                optimizer.load_state_dict(loaded.pop("optimizer"))
    if scheduler is not None and loaded.get("scheduler") is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    if same_world:
        restore_rng(loaded["rng"])
    return loaded


@contextlib.contextmanager
def _adam_steps_kept(optimizer):
    """Load a checkpoint into torch Adam(W) under megatron-core's distributed optimizer, step included.

    Without apex or Transformer Engine, megatron-core 0.16.1 keeps Adam's step in each
    parameter's state (GPU or CPU alike), and two things break a resume:
    - DistributedOptimizer.state_dict() asserts that the per-parameter states hold one step, and a
      fresh optimizer holds none: before loading, each shard gets the state of step 0;
    - the dp_reshardable load copies every state tensor from the checkpoint's shards, where the
      step is a local placeholder (the real one travels in the param groups), so the restored
      step is overwritten with that placeholder: after loading, each state takes its group's step.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    adams = [inner.optimizer for inner in getattr(optimizer, "chained_optimizers", [optimizer])
             if isinstance(inner, DistributedOptimizer) and isinstance(inner.optimizer, torch.optim.Adam)]
    for adam in adams:  # AdamW subclasses Adam
        for group in adam.param_groups:
            on_device = group.get("fused") or group.get("capturable")
            for p in group["params"]:
                if not adam.state[p]:
                    adam.state[p] = {
                        "step": torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu"),
                        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                    }
    yield
    for adam in adams:
        for group in adam.param_groups:
            for p in group["params"]:
                adam.state[p]["step"] = torch.full_like(adam.state[p]["step"], group["step"])
