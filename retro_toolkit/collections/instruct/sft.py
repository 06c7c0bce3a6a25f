"""The `sft` stage: instruction-tune the pretrained model (InstructRetro step 4).

    retro-run RECIPE --stages sft
    from retro_toolkit.collections.instruct.sft import run      # run(StageContext)

Starts from checkpoints/pretrain (or sft.init_from), trains on the sft.datasets blend
with the loss on answer tokens only, and writes checkpoints/sft/ with the same atomic
checkpoints and exact resume as pretraining. With sft.retrieval false (InstructRetro's
default) the retrieval gate is 0 and chunked cross-attention and the encoder are frozen.
"""

from __future__ import annotations

from retro_toolkit.collections.instruct.blend import InstructBlend
from retro_toolkit.collections.instruct.dataset import SftDataset
from retro_toolkit.collections.instruct.format import DEFAULT_SYSTEM
from retro_toolkit.collections.instruct.readers import read_dataset
from retro_toolkit.collections.retro import checkpointing as ckpt
from retro_toolkit.collections.retro import resume
from retro_toolkit.collections.retro import training
from retro_toolkit.collections.retro.engine import build, resume_settings, train_with_checkpoints
from retro_toolkit.collections.text.tokenizer import Tokenizer, workdir_tokenizer
from retro_toolkit.core.stage import StageContext, StageResult
from retro_toolkit.data import data_file
from retro_toolkit.stages.sft import ADDED_KEYS, RESUME_FREE

NAME = "sft"


def sft_dataset(recipe, tokenizer: Tokenizer, num_samples: int, log=print) -> SftDataset:
    s, m = recipe.sft, recipe.model
    datasets = [read_dataset(data_file(d.path), d.format) for d in s.datasets]
    names = [d.name for d in s.datasets]
    for d, records in zip(s.datasets, datasets):
        log(f"{d.name}: {len(records)} records ({d.format}, weight {d.weight}) from {d.path}")
    blend = InstructBlend(names, [len(x) for x in datasets], [float(d.weight) for d in s.datasets], num_samples,
                          recipe.seed)
    return SftDataset(datasets, blend, tokenizer, s.seq_length or m.seq_length, m.chunk_length, m.num_neighbors,
                      m.num_retrieved_chunks * m.chunk_length, retrieval=bool(s.retrieval) and m.arch == "retro",
                      system=s.system_prompt or DEFAULT_SYSTEM)


def run(ctx: StageContext) -> StageResult:
    r, s = ctx.recipe, ctx.recipe.sft
    arch = r.model.arch
    log = lambda msg: ctx.log(f"sft: {msg}")  # noqa: E731
    overrides = training.precision_overrides(s.bf16, s.recompute_activations)
    gate_off = arch == "retro" and not s.retrieval
    if gate_off:
        overrides["retrieval_gate"] = 0.0
    model, config, section = build(r, arch, overrides)
    root = ctx.workdir / "checkpoints" / NAME

    current = resume_settings(r, section, NAME, RESUME_FREE, ADDED_KEYS)
    found = resume.resume_point(root, s.resume, "sft.resume", current, ctx.env.is_main, log)
    if found is None:
        source = ckpt.resolve(s.init_from or ctx.workdir / "checkpoints" / "pretrain", "sft.init_from")
        ckpt.load_model(source, model, section, ctx.workdir)
        log(f"starting from {source}")
    if gate_off:
        for n, p in model.named_parameters():
            p.requires_grad_(not ckpt.is_retrieval_param(n))
        log("retrieval gate 0: chunked cross-attention and the encoder are frozen (sft.retrieval false)")

    ddp, opt, sched = training.wrap_and_optimizer(model, s, config)
    start = 0
    if found is not None:
        start = int(resume.load_resume(found, model, opt, sched)["iteration"])
        log(f"resuming from {found} (iteration {start})")

    dp_rank, dp_size = training.data_parallel()
    training.grad_accumulation(s.global_batch_size, s.micro_batch_size, dp_size)
    tokenizer = workdir_tokenizer(ctx.workdir)
    data = sft_dataset(r, tokenizer, s.train_iters * s.global_batch_size, log)
    batches = training.Batches(data, s.global_batch_size, s.micro_batch_size, dp_rank, dp_size)
    seq = s.seq_length or r.model.seq_length
    log(f"{s.train_iters} iterations x {s.global_batch_size} samples of {seq} tokens, lr {s.lr:g} "
        f"({s.lr_decay_style}), loss on answer tokens only")
    last = train_with_checkpoints(ctx, NAME, root, (model, ddp, opt, sched), batches, start, s, seq,
                                  {"model_section": section, "settings": current}, log)
    final = ckpt.latest(root)
    summary = {"sft_loss": round(last["loss"], 4)} if last else {}
    return StageResult(outputs=[str(final.relative_to(ctx.workdir)), f"checkpoints/{NAME}/{ckpt.LATEST}"],
                       summary=summary)
