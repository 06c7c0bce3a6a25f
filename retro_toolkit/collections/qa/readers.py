"""QA task files, in the original releases' formats or InstructRetro's, into Conversations.

The format is read from the content:

  squad      one JSON object {"data": [{"title", "paragraphs": [{"context", "qas": [{"id",
             "question", "answers": [{"text", ...}], "is_impossible"?}]}]}]} (v1.1 or v2.0).
             The paragraph's context is the question's top-1 context (it goes in the prompt);
             the golds are all its answer texts. v2.0's unanswerable questions
             (is_impossible) are skipped and counted, the common zero-shot practice.
  triviaqa   one JSON object {"Data": [{"Question", "Answer": {"Value", "Aliases", ...}}]};
             golds = Value then Aliases. No contexts (TriviaQA's evidence lives in other files).
  nq_open    JSONL of {"question", "answer": [str, ...]} (Natural Questions open); no contexts.
  qa         InstructRetro's {"question", "answers", "ctxs"} records (instruct/readers.py).
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from retro_toolkit.collections.instruct.format import Context, Conversation
from retro_toolkit.collections.instruct.readers import read_dataset, records
from retro_toolkit.errors import UserError


@dataclass
class QaFile:
    format: str
    conversations: list[Conversation]
    # Questions left out on purpose (SQuAD v2.0's unanswerable ones).
    skipped: int = 0
    notes: list[str] = field(default_factory=list)


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"QA file {path} does not exist: check eval_qa.tasks[].path in the recipe.")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 (byte {e.start}): re-encode it as UTF-8.") from None


def _field(obj: Any, key: str, kind: type, where: str) -> Any:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}.")
    if key not in obj:
        raise UserError(f"{where}: missing key {key!r}.")
    value = obj[key]
    if not isinstance(value, kind) or (kind is str and not value.strip()):
        what = "a non-empty string" if kind is str else f"a JSON {'list' if kind is list else 'object'}"
        raise UserError(f"{where}: key {key!r} must be {what}.")
    return value


def _one_turn(question: str, golds: list[str], contexts: list[Context], where: str) -> Conversation:
    golds = list(dict.fromkeys(golds))
    return Conversation([("user", question), ("assistant", golds[0])], contexts=contexts, answers=golds,
                        question=question, where=where)


def _squad(obj: dict, path: Path) -> QaFile:
    out, skipped = [], 0
    for i, article in enumerate(_field(obj, "data", list, str(path))):
        at = f"{path}: data[{i}]"
        paragraphs = _field(article, "paragraphs", list, at)
        title = article.get("title") if isinstance(article.get("title"), str) else ""
        for j, para in enumerate(paragraphs):
            pat = f"{at}.paragraphs[{j}]"
            context = Context(title, _field(para, "context", str, pat))
            for k, qa in enumerate(_field(para, "qas", list, pat)):
                where = f"{pat}.qas[{k}]"
                question = _field(qa, "question", str, where)
                if qa.get("is_impossible"):
                    skipped += 1
                    continue
                answers = _field(qa, "answers", list, where)
                golds = [_field(a, "text", str, f"{where}.answers[{n}]") for n, a in enumerate(answers)]
                if not golds:
                    raise UserError(f"{where}: 'answers' is empty and the question is not marked "
                                    "'is_impossible': give at least one {\"text\"} answer.")
                out.append(_one_turn(question, golds, [context], f"{where} (id {qa.get('id')})"))
    notes = [f"skipped {skipped} unanswerable (is_impossible) questions"] if skipped else []
    return QaFile("squad", out, skipped, notes)


def _triviaqa(obj: dict, path: Path) -> QaFile:
    out = []
    for i, item in enumerate(_field(obj, "Data", list, str(path))):
        where = f"{path}: Data[{i}]"
        question = _field(item, "Question", str, where)
        if "Answer" not in item:
            raise UserError(f"{where}: missing key 'Answer' (TriviaQA's test files hold no answers: "
                            "evaluate on a dev or verified file).")
        answer = _field(item, "Answer", dict, where)
        golds = [_field(answer, "Value", str, f"{where}.Answer")]
        aliases = answer.get("Aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise UserError(f"{where}.Answer: key 'Aliases' must be a list of strings.")
        out.append(_one_turn(question, golds + aliases, [], f"{where} (id {item.get('QuestionId')})"))
    return QaFile("triviaqa", out)


def _nq_open(path: Path, records: Iterator[tuple[str, Any]]) -> QaFile:
    out = []
    for where, rec in records:
        question = _field(rec, "question", str, where)
        golds = _field(rec, "answer", list, where)
        if not golds or not all(isinstance(a, str) and a.strip() for a in golds):
            raise UserError(f"{where}: key 'answer' must be a non-empty list of non-empty strings.")
        out.append(_one_turn(question, golds, [], where))
    if not out:
        raise UserError(f"{path} holds no records.")
    return QaFile("nq_open", out)


def read_qa_file(path: str | os.PathLike) -> QaFile:
    """A QA file's questions in whichever supported format it is written (see the module docstring)."""
    path = Path(path)
    text = _read_text(path)
    if text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data" is what JSONL (one object a line) gives
                raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}).") from None
            obj = None
        if isinstance(obj, dict) and "question" not in obj:
            if "data" in obj:
                return _squad(obj, path)
            if "Data" in obj:
                return _triviaqa(obj, path)
            raise UserError(f"{path} is one JSON object with neither 'data' (SQuAD) nor 'Data' (TriviaQA), "
                            f"keys: {', '.join(list(obj)[:8])}; write a SQuAD or TriviaQA file, or JSONL of "
                            '{"question", "answers"} or {"question", "answer"} records.')
    rows = records(path)
    first = next(rows, None)
    if first is not None and isinstance(first[1], dict) and "answer" in first[1] and "answers" not in first[1]:
        return _nq_open(path, itertools.chain([first], rows))
    return QaFile("qa", read_dataset(path, "qa"))
