"""The `pretrain` stage: train Retro (or its GPT twin) on the corpus and its neighbours.

    retro-run RECIPE --stages pretrain          # from the CLI
    from retro_toolkit.collections.retro.pretrain import run      # run(StageContext)

Writes checkpoints/pretrain/ (and checkpoints/pretrain_gpt_twin/ with pretrain.gpt_twin),
metrics/<name>.jsonl and tensorboard/<name>/. A rerun after a kill resumes from the
latest checkpoint and reproduces the uninterrupted run's losses exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from retro_toolkit.collections.retro import checkpointing as ckpt
from retro_toolkit.collections.retro import resume
from retro_toolkit.collections.retro import training
from retro_toolkit.collections.retro import engine
from retro_toolkit.collections.retro.engine import build, dataset, train_with_checkpoints
from retro_toolkit.checkpoint.gpt_sources import kind_of
from retro_toolkit.collections.retro.init_from_external import init_from_external
from retro_toolkit.collections.retrieval.neighbors import NEIGHBORS_META
from retro_toolkit.core import files
from retro_toolkit.core.stage import StageContext, StageResult
from retro_toolkit.stages.pretrain import ADDED_KEYS, RESUME_FREE, TWIN


def resume_settings(recipe, section: dict[str, Any]) -> dict[str, Any]:
    """What a resumed pretrain run must share with its checkpoint (see engine.resume_settings)."""
    return engine.resume_settings(recipe, section, "pretrain", RESUME_FREE, ADDED_KEYS)


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
    if not p.init_from:
        if name == TWIN:
            start_twin_like_retro(r, model, overrides)
        return
    kind = kind_of(p.init_from)
    if kind is not None:
        new, loaded = init_from_external(Path(p.init_from), kind, model, section, ctx.workdir, log)
    elif section["arch"] == "gpt":  # the twin, or model.arch gpt: the whole model
        source = ckpt.resolve(p.init_from, "pretrain.init_from")
        ckpt.load_model(source, model, section, ctx.workdir)
        log(f"init_from {source}: the whole GPT")
        return
    else:
        new, loaded = ckpt.init_from_gpt(ckpt.resolve(p.init_from, "pretrain.init_from"), model, section,
                                         ctx.workdir)
    log(f"init_from {p.init_from}: loaded {len(loaded)} tensors; {len(new)} new parameters"
        + (" (chunked cross-attention and encoder, initialised fresh):" if new else ""))
    for n in new:
        log(f"  new: {n}")


def pretrain_model(ctx: StageContext, arch: str, name: str) -> dict[str, Any]:
    """Train one model into checkpoints/<name>/; returns its summary facts."""
    r, p = ctx.recipe, ctx.recipe.pretrain
    root = ctx.workdir / "checkpoints" / name
    overrides = training.precision_overrides(p.bf16, p.recompute_activations)
    model, config, section = build(r, arch, overrides)
    log = lambda msg: ctx.log(f"{name}: {msg}")  # noqa: E731

    settings = resume_settings(r, section)
    found = resume.resume_point(root, p.resume, "pretrain.resume", settings, ctx.env.is_main, log)
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
        state = resume.load_resume(found, model, opt, sched)
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
    if ctx.recipe.model.arch == "retro":  # the database the train split's neighbours were searched in
        meta = files.read_json(ctx.workdir / NEIGHBORS_META)
        summary["neighbors_database_version"] = meta["splits"]["train"].get("database_version", 1)
    return StageResult(outputs=outputs, summary={k: v for k, v in summary.items() if v is not None})
