"""The training engine the stages share: build a model from the recipe, its samples, resume,
and the checkpointed training loop. Stages import it; it imports no stage's code.

    from retro_toolkit.collections.retro.engine import build_trained
    model, section = build_trained(recipe, "retro", checkpoint_dir, workdir)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from omegaconf import OmegaConf

from retro_toolkit.collections.retro import checkpointing as ckpt
from retro_toolkit.collections.retro import training
from retro_toolkit.collections.retro.config import config_from_model_section, inference_overrides
from retro_toolkit.collections.retro.dataset import RetroDataset
from retro_toolkit.collections.retro.model import build_model
from retro_toolkit.collections.retro.parallel import initialize
from retro_toolkit.collections.text.tokenizer import workdir_tokenizer
from retro_toolkit.core.stage import StageContext
from retro_toolkit.recipe.model import ADDED_KEYS as MODEL_ADDED_KEYS


def resume_settings(recipe, section: dict[str, Any], stage: str, free: frozenset[str],
                    added_keys: tuple[tuple[str, object], ...] = ()) -> dict[str, Any]:
    """Everything that makes a resumed run of `stage` continue the same training, flattened for
    messages: the model section, the stage's section less the `free` keys and the `added_keys`
    at their old behaviour, the seed."""
    p = OmegaConf.to_container(recipe[stage], resolve=True)
    out = {f"model.{k}": v for k, v in section.items()}
    added = dict(added_keys)
    out.update({f"{stage}.{k}": v for k, v in p.items()
                if k not in free and not (k in added and v == added[k])})
    out["seed"] = recipe.seed
    return out


def model_section(recipe, arch: str) -> dict[str, Any]:
    """The recipe's model section as plain data, for `arch`, with the vocabulary filled in."""
    section = OmegaConf.to_container(recipe.model, resolve=True)
    section["arch"] = arch
    for key, default in MODEL_ADDED_KEYS:  # at the old behaviour, older checkpoints' resume checks match
        if section.get(key) == default:
            del section[key]
    if not section.get("vocab_size"):
        section["vocab_size"] = workdir_tokenizer(recipe.workdir).vocab_size
    return section


def build(recipe, arch: str, overrides: dict[str, Any] | None = None):
    """(model on this job's device, its config, its section) for the recipe's model as `arch`."""
    section = model_section(recipe, arch)
    pad_id = workdir_tokenizer(recipe.workdir).pad_id
    config, args = config_from_model_section(section, neighbor_pad_id=pad_id, **(overrides or {}))
    initialize(config.tensor_model_parallel_size, recipe.seed)
    model = build_model(config, args)
    if config.bf16:
        model = model.bfloat16()
    return model.to(training.device()), config, section


def build_trained(recipe, arch: str, source: Path, workdir: Path):
    """(model, section) of checkpoint `source` for evaluation, in eval mode: built uninitialised in
    the dtype its weights were saved in (bf16 after a bf16 run) on this job's device, then loaded."""
    model, _, section = build(recipe, arch, inference_overrides(ckpt.saved_dtype(source)))
    ckpt.load_model(source, model, section, workdir)
    return model.eval(), section


def dataset(recipe, split: str, arch: str, num_samples: int | None, shuffle: bool = True,
            blend: bool = False) -> RetroDataset:
    """A split's samples for `arch`; `blend` applies pretrain.source_weights (training only)."""
    m = recipe.model
    weights = recipe.pretrain.source_weights if blend else None
    pad_id = workdir_tokenizer(recipe.workdir).pad_id
    return RetroDataset(recipe.workdir, split, m.seq_length, m.chunk_length, m.num_neighbors,
                        m.num_retrieved_chunks * m.chunk_length, pad_id, seed=recipe.seed,
                        num_samples=num_samples, with_neighbors=arch == "retro", shuffle=shuffle,
                        source_weights=list(weights) if weights is not None else None)


def train_with_checkpoints(ctx: StageContext, name: str, root: Path, parts: tuple, batches: training.Batches,
                           start: int, p, seq_length: int, common: dict[str, Any],
                           log: Callable[[str], None]) -> dict[str, Any]:
    """Iterations start+1 .. p.train_iters with checkpoints (every p.save_interval and at the end) and
    metrics/<name>.jsonl; parts = (model, ddp, optimizer, scheduler). Returns the last metrics row."""
    model, ddp, opt, sched = parts
    common = {**common, "consumed_samples": 0, "tokenizer_sha256": workdir_tokenizer(ctx.workdir).sha256}

    def save(iteration: int) -> None:
        common["consumed_samples"] = iteration * p.global_batch_size
        path = ckpt.save(root, iteration, model, opt, sched, common)
        log(f"saved {path.relative_to(ctx.workdir)}")

    metrics = training.MetricsLog(ctx.workdir, name, start, p.tensorboard, ctx.env.is_main)
    try:
        if start >= p.train_iters:
            log(f"already trained {start} iterations (train_iters = {p.train_iters})")
            return {}
        return training.train(ddp, opt, sched, batches, start, p.train_iters, seq_length, metrics, log,
                              p.log_interval, save, p.save_interval, p.exit_duration_minutes)
    finally:
        metrics.close()
