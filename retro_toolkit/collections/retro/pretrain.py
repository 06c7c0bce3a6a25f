"""The `pretrain` stage: train Retro (or its GPT twin) on the corpus and its neighbours.

    retro-run RECIPE --stages pretrain          # from the CLI
    from retro_toolkit.collections.retro.pretrain import pretrain_model   # from Python

Writes checkpoints/pretrain/ (and checkpoints/pretrain_gpt_twin/ with pretrain.gpt_twin),
metrics/<name>.jsonl and tensorboard/<name>/. A rerun after a kill resumes from the
latest checkpoint and reproduces the uninterrupted run's losses exactly.
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
from retro_toolkit.collections.text.tokenizer import Tokenizer
from retro_toolkit.collections.text.tokenizer_stage import MODEL_FILE
from retro_toolkit.core import files
from retro_toolkit.core.stage import StageContext, StageResult
from retro_toolkit.runner.stages import MODEL_ADDED_KEYS, PRETRAIN_ADDED_KEYS

TWIN = "pretrain_gpt_twin"
# pretrain keys a resumed run may change: how long to train and how to report, not what.
RESUME_FREE = {"train_iters", "save_interval", "log_interval", "tensorboard", "resume", "init_from", "gpt_twin",
               "exit_duration_minutes"}


def resume_settings(recipe, section: dict[str, Any], stage: str = "pretrain",
                    free: set[str] = RESUME_FREE) -> dict[str, Any]:
    """Everything that makes a resumed run of `stage` continue the same training, flattened for
    messages: the model section, the stage's section less the `free` keys, the seed."""
    p = OmegaConf.to_container(recipe[stage], resolve=True)
    out = {f"model.{k}": v for k, v in section.items()}
    added = dict(PRETRAIN_ADDED_KEYS) if stage == "pretrain" else {}
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
        section["vocab_size"] = Tokenizer(Path(recipe.workdir) / MODEL_FILE).vocab_size
    return section


def build(recipe, arch: str, overrides: dict[str, Any] | None = None):
    """(model on this job's device, its config, its section) for the recipe's model as `arch`."""
    section = model_section(recipe, arch)
    pad_id = Tokenizer(Path(recipe.workdir) / MODEL_FILE).pad_id
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
    pad_id = Tokenizer(Path(recipe.workdir) / MODEL_FILE).pad_id
    return RetroDataset(recipe.workdir, split, m.seq_length, m.chunk_length, m.num_neighbors,
                        m.num_retrieved_chunks * m.chunk_length, pad_id, seed=recipe.seed,
                        num_samples=num_samples, with_neighbors=arch == "retro", shuffle=shuffle,
                        source_weights=list(weights) if weights is not None else None)


def start_twin_like_retro(recipe, twin, overrides: dict[str, Any]) -> None:
    """Give a fresh GPT twin the decoder weights a fresh Retro model of the recipe starts with."""
    retro, _, _ = build(recipe, "retro", overrides)
    twin.load_state_dict(retro.state_dict(), strict=False)


def initial_weights(ctx: StageContext, name: str, model, section: dict[str, Any], overrides: dict[str, Any],
                    log: Callable[[str], None]) -> None:
    """Weights a fresh run starts from: random, the GPT checkpoint of pretrain.init_from, and for
    the GPT twin the same decoder as the Retro model (both random-initialised alike, or both
    from init_from)."""
    r, p = ctx.recipe, ctx.recipe.pretrain
    if name == TWIN and p.init_from:
        source = ckpt.resolve(p.init_from, "pretrain.init_from")
        ckpt.load_model(source, model, section, ctx.workdir)
        log(f"init_from {source}: the whole GPT twin")
    elif name == TWIN:
        start_twin_like_retro(r, model, overrides)
    elif p.init_from and section["arch"] == "retro":
        source = ckpt.resolve(p.init_from, "pretrain.init_from")
        new, loaded = ckpt.init_from_gpt(source, model, section, ctx.workdir)
        log(f"init_from {source}: loaded {len(loaded)} decoder tensors; {len(new)} new parameters "
            f"(chunked cross-attention and encoder, initialised fresh):")
        for n in new:
            log(f"  new: {n}")


def train_with_checkpoints(ctx: StageContext, name: str, root: Path, parts: tuple, batches: training.Batches,
                           start: int, p, seq_length: int, common: dict[str, Any],
                           log: Callable[[str], None]) -> dict[str, Any]:
    """Iterations start+1 .. p.train_iters with checkpoints (every p.save_interval and at the end) and
    metrics/<name>.jsonl; parts = (model, ddp, optimizer, scheduler). Returns the last metrics row."""
    model, ddp, opt, sched = parts
    common = {**common, "consumed_samples": 0, "tokenizer_sha256": files.sha256_file(ctx.workdir / MODEL_FILE)}

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


def pretrain_model(ctx: StageContext, arch: str, name: str) -> dict[str, Any]:
    """Train one model into checkpoints/<name>/; returns its summary facts."""
    r, p = ctx.recipe, ctx.recipe.pretrain
    root = ctx.workdir / "checkpoints" / name
    overrides = training.precision_overrides(p.bf16, p.recompute_activations)
    model, config, section = build(r, arch, overrides)
    log = lambda msg: ctx.log(f"{name}: {msg}")  # noqa: E731

    settings = resume_settings(r, section)
    found = ckpt.resume_point(root, p.resume, "pretrain.resume", settings, ctx.env.is_main, log)
    if found is None:
        initial_weights(ctx, name, model, section, overrides, log)
    if p.freeze_decoder and arch == "retro":
        for n, param in model.named_parameters():
            param.requires_grad_(ckpt.is_retrieval_param(n))
        trainable = sum(x.numel() for x in model.parameters() if x.requires_grad)
        log(f"freeze_decoder: training {trainable:,} of {sum(x.numel() for x in model.parameters()):,} "
            "parameters (chunked cross-attention + encoder)")

    ddp, opt, sched = training.wrap_and_optimizer(model, p, config)
    start = 0
    if found is not None:
        state = ckpt.load_resume(found, model, opt, sched)
        start = int(state["iteration"])
        log(f"resuming from {found} (iteration {start}); LR schedule as saved: warmup {sched.lr_warmup_steps}, "
            f"{sched.lr_decay_style} decay to {sched.min_lr:g} over {sched.lr_decay_steps} iterations")

    dp_rank, dp_size = training.data_parallel()
    training.grad_accumulation(p.global_batch_size, p.micro_batch_size, dp_size)
    data = dataset(r, "train", arch, p.train_iters * p.global_batch_size, blend=True)
    batches = training.Batches(data, p.global_batch_size, p.micro_batch_size, dp_rank, dp_size)
    total = sum(x.numel() for x in model.parameters()) * config.tensor_model_parallel_size
    log(f"{arch}: ~{total / 1e6:.2f}M parameters, {data.windows} training windows of {r.model.seq_length} "
        f"tokens, {p.train_iters} iterations x {p.global_batch_size} samples "
        f"(dp {dp_size}, tp {config.tensor_model_parallel_size}, micro {p.micro_batch_size}, "
        f"accumulation {batches.accumulation})")
    last = train_with_checkpoints(ctx, name, root, (model, ddp, opt, sched), batches, start, p, r.model.seq_length,
                                  {"model_section": section, "settings": settings}, log)
    return {f"{name}_loss": round(last["loss"], 4) if last else None,
            f"{name}_s_per_iter": round(last["seconds_per_iteration"], 3) if last else None}


def run(ctx: StageContext) -> StageResult:
    p = ctx.recipe.pretrain
    models = [(ctx.recipe.model.arch, "pretrain")] + ([("gpt", TWIN)] if p.gpt_twin else [])
    summary: dict[str, Any] = {}
    outputs: list[str] = []
    for arch, name in models:
        summary.update(pretrain_model(ctx, arch, name))
        final = ckpt.latest(ctx.workdir / "checkpoints" / name)
        outputs += [str(final.relative_to(ctx.workdir)), f"checkpoints/{name}/{ckpt.LATEST}"]
    return StageResult(outputs=outputs, summary={k: v for k, v in summary.items() if v is not None})
