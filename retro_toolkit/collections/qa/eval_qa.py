"""The `eval_qa` stage: zero-shot QA with EM/F1 (InstructRetro step 5).

    retro-run RECIPE --stages eval_qa
    from retro_toolkit.collections.qa.eval_qa import evaluate_task

For each task in eval_qa.tasks (its file in any format qa/readers.py reads): every
question goes through the InstructRetro prompt (top-1 context in the prompt, the next k
contexts as every chunk's neighbours, or live retrieval at chunk boundaries), greedy
decoding to the end-of-document token, a stop string or eval_qa.max_new_tokens, then
exact match and F1 (in %) against all gold answers. Writes eval/qa/<task>.jsonl (one
prediction per question) and eval/qa/scores.json ({task: {"em", "f1", "n"}}), and prints
a table.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

import numpy as np

from retro_toolkit.collections.generate import FixedNeighbors, LiveRetrieval, SamplingParams, generate_text
from retro_toolkit.collections.instruct.dataset import context_neighbors
from retro_toolkit.collections.instruct.format import DEFAULT_SYSTEM, Context, Conversation, encode_prompt
from retro_toolkit.collections.qa.metrics import exact_match, f1_score
from retro_toolkit.collections.qa.tasks import load_task
from retro_toolkit.collections.retrieval import db_version
from retro_toolkit.collections.retro import checkpointing as ckpt
from retro_toolkit.collections.retro.engine import build_trained
from retro_toolkit.collections.text.tokenizer import workdir_tokenizer
from retro_toolkit.core import files
from retro_toolkit.core.stage import StageContext, StageResult

OUTPUT_DIR = "eval/qa"


def retrieved_contexts(retriever, questions: list[str], n: int) -> tuple[list[list[Context]], np.ndarray]:
    """The n nearest database chunks of each question, as contexts, and their neighbour tokens [b, n, r]."""
    hits = retriever.search(questions, k=n)
    contexts = [[Context("", retriever.chunk_text(int(i), with_continuation=True)) for i in row if i >= 0]
                for row in hits.ids]
    return contexts, hits.tokens


def evaluate_task(model, tokenizer, questions: list[Conversation], params: SamplingParams, batch_size: int,
                  contexts: str = "ctxs", live: bool = False, retriever=None,
                  system: Optional[str] = None) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """(one row per question, {"em", "f1", "n"}) for a task's questions."""
    k, r = model.config.num_neighbors, model.config.retrieved_length
    rows: list[dict[str, Any]] = []
    for start in range(0, len(questions), batch_size):
        batch = questions[start : start + batch_size]
        neighbour_tokens = None
        if contexts == "retrieve":
            found, hit_tokens = retrieved_contexts(retriever, [q.question for q in batch], k + 1)
            batch = [dataclasses.replace(q, contexts=c) for q, c in zip(batch, found)]
            neighbour_tokens = hit_tokens[:, 1 : 1 + k]
        elif contexts == "none":
            batch = [dataclasses.replace(q, contexts=[]) for q in batch]
        prompts = [encode_prompt(q, tokenizer, system or DEFAULT_SYSTEM) for q in batch]
        if live:
            source = LiveRetrieval(retriever, k)
        elif neighbour_tokens is not None:
            source = FixedNeighbors.from_tensor(neighbour_tokens)
        else:
            source = FixedNeighbors.from_tensor(np.stack([context_neighbors(q.contexts[1:], tokenizer, k, r) for q in batch]))
        outs = generate_text(model, tokenizer, prompts, params, source)
        for q, out in zip(batch, outs):
            pred = out.text.strip()
            rows.append({"where": q.where, "question": q.question, "answers": q.answers, "prediction": pred,
                         "em": exact_match(pred, q.answers), "f1": f1_score(pred, q.answers),
                         "finish_reason": out.finish_reason,
                         "context": q.contexts[0].render() if q.contexts else None})
    n = len(rows)
    score = {"em": round(100 * sum(x["em"] for x in rows) / n, 2), "f1": round(100 * sum(x["f1"] for x in rows) / n, 2),
             "n": n}
    return rows, score


def table(scores: dict[str, dict[str, float]]) -> str:
    lines = [f"{'task':<14}{'EM':>8}{'F1':>8}{'n':>7}"]
    lines += [f"{t:<14}{s['em']:>8.2f}{s['f1']:>8.2f}{s['n']:>7d}" for t, s in scores.items()]
    return "\n".join(lines)


def run(ctx: StageContext) -> StageResult:
    r, q = ctx.recipe, ctx.recipe.eval_qa
    where = q.checkpoint if q.checkpoint not in ("sft", "pretrain") else ctx.workdir / "checkpoints" / q.checkpoint
    source = ckpt.resolve(where, "eval_qa.checkpoint")
    model, _ = build_trained(r, r.model.arch, source, ctx.workdir)
    ctx.log(f"eval_qa: weights from {source} ({str(model.config.params_dtype)[6:]})")
    tokenizer = workdir_tokenizer(ctx.workdir)
    retriever = None
    if q.contexts == "retrieve" or q.live_retrieval:
        from retro_toolkit.collections.retrieval.retriever import Retriever

        retriever = Retriever(ctx.workdir)
    params = SamplingParams(max_new_tokens=q.max_new_tokens, stop=list(q.stop))
    out_dir = ctx.workdir / OUTPUT_DIR
    brief = db_version.brief(ctx.workdir)  # the database questions retrieve from
    version = brief["version"] if brief else None
    scores: dict[str, dict[str, float]] = {}
    outputs = []
    for task in q.tasks:
        questions = load_task(task.name, task.path, task.max_samples, lambda m: ctx.log(f"eval_qa: {m}"))
        rows, score = evaluate_task(model, tokenizer, questions, params, q.batch_size, q.contexts, q.live_retrieval,
                                    retriever, r.sft.system_prompt)
        scores[task.name] = {**score, "database_version": version}
        if ctx.env.is_main:
            files.write_text(out_dir / f"{task.name}.jsonl", "".join(json.dumps(x) + "\n" for x in rows))
        outputs.append(f"{OUTPUT_DIR}/{task.name}.jsonl")
        ctx.log(f"eval_qa: {task.name}: EM {score['em']:.2f} F1 {score['f1']:.2f} over {score['n']} questions")
    if ctx.env.is_main:
        files.write_json(out_dir / "scores.json", scores)
    ctx.log("eval_qa scores:\n" + table(scores))
    return StageResult(outputs=outputs + [f"{OUTPUT_DIR}/scores.json"],
                       summary={**{f"{t}_{m}": s[m] for t, s in scores.items() for m in ("em", "f1")},
                                "database_version": version})
