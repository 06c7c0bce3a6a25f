"""The `eval_ppl` stage: perplexity of the pretrained model on held-out splits.

For a Retro model each split gets `ppl` (with retrieval) and `ppl_no_retrieval` (the same
weights with retrieval gate 0: the decoder alone); with pretrain.gpt_twin also
`ppl_gpt_twin`. Written to eval/ppl.json:

    {"valid": {"ppl": 12.9, "ppl_no_retrieval": 17.7, "tokens": 4096, "samples": 16}, ...}
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as td
from megatron.core import parallel_state

from retro_toolkit.collections.retrieval import db_version
from retro_toolkit.collections.retro import checkpointing as ckpt
from retro_toolkit.collections.retro import training
from retro_toolkit.collections.retro.engine import build_trained, dataset
from retro_toolkit.stages.pretrain import TWIN
from retro_toolkit.core import files
from retro_toolkit.core.stage import StageContext, StageResult

OUTPUT = "eval/ppl.json"


@torch.no_grad()
def loss_sum(model, data, micro_batch: int) -> tuple[float, int]:
    """(sum of token losses, tokens) over all samples of `data`, split over data-parallel ranks."""
    dev = training.device()
    dp_rank, dp_size = training.data_parallel()
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=dev)  # NCCL reduces only GPU tensors
    indices = list(range(dp_rank, len(data), dp_size))
    for start in range(0, len(indices), micro_batch):
        batch = training.collate([data[i] for i in indices[start:start + micro_batch]], dev)
        loss = model(batch["tokens"], batch.get("neighbor_tokens"), labels=batch["labels"])
        total[0] += loss.double().sum()
        total[1] += loss.numel()
    if dp_size > 1:
        td.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return float(total[0]), int(total[1])


def perplexity(model, data, micro_batch: int) -> tuple[float, int]:
    s, n = loss_sum(model, data, micro_batch)
    return math.exp(s / n), n


def run(ctx: StageContext) -> StageResult:
    r, e = ctx.recipe, ctx.recipe.eval_ppl
    arch = r.model.arch
    models = [(arch, "pretrain")] + ([("gpt", TWIN)] if r.pretrain.gpt_twin else [])
    results: dict[str, dict[str, Any]] = {}
    for arch_, name in models:
        source = ckpt.resolve(ctx.workdir / "checkpoints" / name, f"checkpoints/{name}")
        model, _ = build_trained(r, arch_, source, ctx.workdir)
        ctx.log(f"{name}: weights from {source.relative_to(ctx.workdir)} ({str(model.config.params_dtype)[6:]})")
        for split in e.splits:
            data = dataset(r, split, arch_, None, shuffle=False)  # every window, in stream order
            data.num_samples = min(data.windows, e.max_samples or data.windows)
            row = results.setdefault(split, {})
            if name == TWIN:
                row["ppl_gpt_twin"], _ = perplexity(model, data, e.micro_batch_size)
                continue
            row["ppl"], row["tokens"] = perplexity(model, data, e.micro_batch_size)
            row["samples"] = len(data)
            if arch_ == "retro":
                gate = model.config.retrieval_gate
                model.config.retrieval_gate = 0.0
                try:
                    row["ppl_no_retrieval"], _ = perplexity(model, data, e.micro_batch_size)
                finally:
                    model.config.retrieval_gate = gate
            else:
                row["ppl_no_retrieval"] = row["ppl"]
            ctx.log(f"{split}: ppl {row['ppl']:.3f} (no retrieval {row['ppl_no_retrieval']:.3f}) "
                    f"over {row['tokens']:,} tokens")
    for split, row in results.items():
        if "ppl_gpt_twin" in row:
            ctx.log(f"{split}: GPT twin ppl {row['ppl_gpt_twin']:.3f} vs Retro {row['ppl']:.3f}")
    version = db_version.brief(ctx.workdir)  # the database whose valid/test neighbours were read
    for row in results.values():
        row["database_version"] = version["version"] if version else None
    if ctx.env.is_main:
        files.write_json(ctx.workdir / OUTPUT, results)
    summary = {}
    for split, row in results.items():
        for k, v in row.items():
            if k.startswith("ppl"):
                summary[f"{split}_{k}"] = round(v, 3)
    summary["database_version"] = version["version"] if version else None
    return StageResult(outputs=[OUTPUT], summary=summary)
