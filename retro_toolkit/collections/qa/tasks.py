"""QA tasks: which file format each reads and how its question is put to the model.

Every task reads any format qa/readers.py knows (SQuAD v1.1/v2.0, TriviaQA, NQ-open or
InstructRetro's {"question", "answers", "ctxs"}), told apart by content; the tasks differ
in the instruction in front of the question: a short span (nq, tqa, squad, newsqa,
quoref, narrativeqa, drop, and the smoke set) or yes/no (boolq).
"""

from __future__ import annotations

from typing import Callable, Optional

from retro_toolkit.collections.instruct.format import Conversation
from retro_toolkit.collections.qa.readers import read_qa_file
from retro_toolkit.data import data_file

SHORT = "Answer the question with a short phrase only."
YES_NO = "Answer the question with yes or no only."
TASKS = {name: SHORT for name in ("nq", "tqa", "squad1.1", "squad2.0", "newsqa", "quoref", "narrativeqa", "drop",
                                  "smoke")}
TASKS["boolq"] = YES_NO


def load_task(name: str, path: str, max_samples: Optional[int] = None,
              log: Optional[Callable[[str], None]] = None) -> list[Conversation]:
    """The task's questions as one-turn conversations (the user turn carries the instruction).

    log, when given, hears the file's format and any questions the reader skipped.
    """
    qa = read_qa_file(data_file(path))
    if log is not None:
        log(f"{name}: {path} read as {qa.format}, {len(qa.conversations)} questions"
            + "".join(f"; {note}" for note in qa.notes))
    records = qa.conversations[:max_samples]
    out = []
    for rec in records:
        out.append(Conversation([("user", f"{TASKS[name]} {rec.question}")], contexts=rec.contexts,
                                answers=rec.answers, question=rec.question, where=rec.where))
    return out
