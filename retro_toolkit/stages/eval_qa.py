"""Stage `eval_qa`: zero-shot QA: generate answers, EM/F1 per task."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from retro_toolkit.collections.qa.tasks import TASKS
from retro_toolkit.errors import UserError
from retro_toolkit.recipe.checker import check_data_file, check_exists
from retro_toolkit.recipe.fields import WHY_BATCH, WHY_COUNT, WHY_SHAPE, bounded, filepath
from retro_toolkit.stages.spec import StageSpec


@dataclass
class QaTaskConfig:
    # nq, tqa, squad1.1, squad2.0, newsqa, quoref, narrativeqa, drop (short answers),
    # boolq (yes/no), or smoke (this project's questions about the smoke corpus).
    name: Literal[tuple(TASKS)] = "???"
    # The task's QA file: SQuAD v1.1/v2.0 or TriviaQA JSON, NQ-open JSONL, InstructRetro's
    # {"question", "answers", "ctxs"} records (JSON list or JSONL), or builtin:smoke-qa.
    path: str = filepath("???")
    # Evaluate only the first N questions (null = all).
    max_samples: Optional[int] = bounded(None, 1, 10**12, WHY_COUNT)


@dataclass
class EvalQaConfig:
    tasks: list[QaTaskConfig] = field(default_factory=list)
    # Which weights answer: "sft", "pretrain", or a checkpoint folder.
    checkpoint: str = filepath("sft", words=("sft", "pretrain"))
    # Where a question's contexts come from: "ctxs" (the task file's), "retrieve" (this work
    # directory's index, queried with the question) or "none". The top-1 context goes in the
    # prompt, the next model.num_neighbors to the encoder for every chunk.
    contexts: Literal["ctxs", "retrieve", "none"] = "ctxs"
    # Re-query the index with each completed chunk while generating (Retro's own retrieval)
    # instead of giving every chunk the question's contexts.
    live_retrieval: bool = False
    max_new_tokens: int = bounded(32, 1, 2**20, WHY_SHAPE)
    # Generation stops at the end-of-document token or at any of these strings.
    stop: list[str] = field(default_factory=lambda: ["\n"])
    # Questions generated together.
    batch_size: int = bounded(8, 1, 2**20, WHY_BATCH)


def check(r: dict[str, Any]) -> None:
    q = r["eval_qa"]
    if not q["tasks"]:
        raise UserError("recipe key 'eval_qa.tasks' is empty: list at least one {name, path}.")
    for i, t in enumerate(q["tasks"]):
        check_data_file(t["path"], f"eval_qa.tasks[{i}].path")
    check_exists(q["checkpoint"], "eval_qa.checkpoint", "; use sft, pretrain or a checkpoint folder.")


def _reads(r) -> list[tuple[str, Any]]:
    q = r.eval_qa
    out = [("retrieval.embedder.path", r.retrieval.embedder.path)] if q.contexts == "retrieve" or q.live_retrieval else []
    out += [(f"eval_qa.tasks[{i}].path", t.path) for i, t in enumerate(q.tasks)]
    return out + ([("eval_qa.checkpoint", q.checkpoint)] if os.path.isabs(q.checkpoint) else [])


STAGE = StageSpec("eval_qa", "eval_qa", depends_on=("sft",), config_keys=("eval_qa", "sft.system_prompt"),
                  entry="retro_toolkit.collections.qa.eval_qa:run", summary=__doc__, check=check, gated=True,
                  reads=_reads, reads_database=True)
