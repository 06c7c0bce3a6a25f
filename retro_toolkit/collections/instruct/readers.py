"""Readers for the three instruction-data formats, into Conversations.

  conversation      JSONL: {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  qa                InstructRetro's QA files, a JSON list or JSONL of
                    {"question": str, "answers": [str, ...], "ctxs": [{"title", "text"}, ...]}
                    ("answers" may be one string; "ctxs" is optional)
  prompt_response   JSONL: {"prompt": str, "response": str}

Every problem names the file, the record (1-based line or list index) and the field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from retro_toolkit.collections.instruct.format import Context, Conversation
from retro_toolkit.errors import UserError

FORMATS = ("conversation", "qa", "prompt_response")


def records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) of a JSON list or JSONL file, where = "PATH:record N" or "PATH:line N"."""
    if not path.is_file():
        raise UserError(f"instruction data file {path} does not exist: check the path in the recipe.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 (byte {e.start}): re-encode it as UTF-8.") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}).") from None
        for i, item in enumerate(items, 1):
            yield f"{path}:record {i}", item
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:line {n}", json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:line {n}: not valid JSON ({e.msg}).") from None


def _text(record: Any, key: str, where: str) -> str:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    if key not in record:
        raise UserError(f"{where}: missing field {key!r}.")
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: field {key!r} must be a non-empty string.")
    return value


def _conversation(record: Any, where: str) -> Conversation:
    if not isinstance(record, dict) or "messages" not in record:
        raise UserError(f"{where}: missing field 'messages'.")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: field 'messages' must be a non-empty list.")
    system = None
    turns: list[tuple[str, str]] = []
    for j, msg in enumerate(messages):
        at = f"{where}: messages[{j}]"
        role = _text(msg, "role", at)
        content = _text(msg, "content", at)
        if role == "system":
            if j:
                raise UserError(f"{at}: a system message may only come first.")
            system = content
            continue
        want = "user" if not turns or turns[-1][0] == "assistant" else "assistant"
        if role not in ("user", "assistant"):
            raise UserError(f"{at}: role {role!r} is not one of system, user, assistant.")
        if role != want:
            raise UserError(f"{at}: expected a {want} message (turns alternate, starting with the user).")
        turns.append((role, content))
    if not turns or turns[-1][0] != "assistant":
        raise UserError(f"{where}: the conversation must end with an assistant message.")
    return Conversation(turns, system=system, where=where)


def _qa(record: Any, where: str) -> Conversation:
    question = _text(record, "question", where)
    if "answers" not in record:
        raise UserError(f"{where}: missing field 'answers'.")
    answers = record["answers"]
    if isinstance(answers, bool):  # BoolQ
        answers = "yes" if answers else "no"
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise UserError(f"{where}: field 'answers' must be a non-empty list of strings.")
    contexts = []
    ctxs = record.get("ctxs") or []
    if not isinstance(ctxs, list):
        raise UserError(f"{where}: field 'ctxs' must be a list of {{'title', 'text'}} objects.")
    for j, c in enumerate(ctxs):
        text = _text(c, "text", f"{where}: ctxs[{j}]")
        contexts.append(Context(str(c.get("title") or ""), text))
    return Conversation([("user", question), ("assistant", answers[0])], contexts=contexts, answers=answers,
                        question=question, where=where)


def _prompt_response(record: Any, where: str) -> Conversation:
    return Conversation([("user", _text(record, "prompt", where)), ("assistant", _text(record, "response", where))],
                        where=where)


def read_dataset(path: str | os.PathLike, fmt: str) -> list[Conversation]:
    """All records of one file as Conversations."""
    read = {"conversation": _conversation, "qa": _qa, "prompt_response": _prompt_response}.get(fmt)
    if read is None:
        raise UserError(f"unknown instruction data format {fmt!r}: use one of {', '.join(FORMATS)}.")
    out = [read(record, where) for where, record in records(Path(path))]
    if not out:
        raise UserError(f"{path} holds no records.")
    return out
