"""The up-front corpus probe: the first few MiB, files and records of a file or folder
source, read before any job exists, so that an empty corpus, bad UTF-8 or a .jsonl
record without its text field is refused at once."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

from retro_toolkit.errors import UserError

# How much of a corpus the up-front check reads: enough to catch a wrong file or a wrong
# text_key at once, little enough that a multi-GB corpus costs milliseconds.
PROBE_BYTES = 4 << 20
PROBE_RECORDS = 100
PROBE_FILES = 100


def probe_content(p: Path, text_key: str, key: str, policy: str) -> None:
    """Read the start of a file or folder source as the reader will, and refuse what it would
    refuse (policy: data.on_invalid_utf8): bad UTF-8, bad .jsonl records, no text at all."""
    from retro_toolkit.collections.text import formats

    kind = formats.kind_of(p)
    try:
        if kind == "folder":
            if all(k == "txt" for _, k in formats.folder_files(p)):  # other members: their readers check them
                _probe_txt_folder(p, key, policy)
        elif kind == "jsonl":
            _probe_jsonl(p, text_key, key, policy)
        elif kind == "txt":
            _probe_txt(p, key, policy)
    except Exception as e:
        if formats.is_damage(e):
            raise formats.damaged(p, e) from None
        if not isinstance(e, OSError):
            raise
        raise UserError(f"{key}.path: cannot read {e.filename or p}: {e.strerror}. "
                        "Fix its permissions or the path.") from None


def _refuse_invalid_utf8(raw: bytes, final: bool, path: Path, first_line: int = 1) -> None:
    """Raise naming the file and line of the first invalid byte (`raw` starts at `first_line`);
    `final` False: `raw` is a prefix, so a character cut at its end is not an error."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(raw, final=final)
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        raise UserError(
            f"{path}:{line}: invalid UTF-8 at byte {e.start} ({raw[e.start:e.start + 4]!r}). Fix the file, or set "
            "data.on_invalid_utf8=replace to replace bad bytes with U+FFFD."
        ) from None


def _read_prefix(path: Path, limit: int) -> tuple[bytes, bool]:
    """The first `limit` bytes of a file and whether that is all of it."""
    with open(path, "rb") as f:
        raw = f.read(limit + 1)
    return raw[:limit], len(raw) <= limit


def _probe_txt(path: Path, key: str, policy: str) -> None:
    raw, whole = _read_prefix(path, PROBE_BYTES)
    if policy == "error":
        _refuse_invalid_utf8(raw, whole, path)
    if whole and not raw.decode("utf-8", errors="replace").strip():
        raise UserError(
            f"{key}.path: {path} is empty (a .txt source is one document, and this one has no text). "
            f"Point {key}.path at the corpus, or remove the source."
        )


def _probe_txt_folder(folder: Path, key: str, policy: str) -> None:
    budget, seen_text = PROBE_BYTES, False
    for n, p in enumerate(folder.rglob("*.txt")):
        if n >= PROBE_FILES or budget <= 0:
            return  # not read to the end: emptiness is not known, and no error was seen
        raw, whole = _read_prefix(p, min(budget, PROBE_BYTES))
        budget -= len(raw)
        if policy == "error":
            _refuse_invalid_utf8(raw, whole, p)
        seen_text = seen_text or bool(raw.decode("utf-8", errors="replace").strip())
    if not seen_text:
        raise UserError(
            f"{key}.path: every .txt file in folder {folder} is empty, so the source has no document. "
            f"Point {key}.path at the corpus, or remove the source."
        )


def _probe_jsonl(path: Path, text_key: str, key: str, policy: str) -> None:
    """The first PROBE_RECORDS records must be JSON objects with a string `text_key`; a file
    read to its end must hold at least one non-empty document."""
    from retro_toolkit.collections.text.formats import open_lines

    budget, records, lineno, seen_text, at_end = PROBE_BYTES, 0, 0, False, False
    with open_lines(path) as f:
        while records < PROBE_RECORDS and budget > 0:
            raw = f.readline(budget)
            if not raw:
                at_end = True
                break
            lineno += 1
            cut = len(raw) == budget and not raw.endswith(b"\n")
            budget -= len(raw)
            where = f"{path}:{lineno}"
            if policy == "error":
                _refuse_invalid_utf8(raw, not cut, path, lineno)
            if cut:
                return  # a record longer than the probe: the reader checks it in full
            line = raw.decode("utf-8", errors="replace").strip()
            if not line:
                continue
            records += 1
            seen_text = _probe_record(line, where, text_key, key) or seen_text
    # Stopped before the end, the rest of the file may hold the text: the reader checks it.
    if at_end and not seen_text:
        what = "has no records" if records == 0 else f"has no non-empty '{text_key}' in any of its {records} records"
        raise UserError(
            f"{key}.path: {path} {what}, so the source has no document. Point {key}.path at the corpus, "
            f"or set {key}.text_key to the field that holds the text."
        )


def _probe_record(line: str, where: str, text_key: str, key: str) -> bool:
    """Check one .jsonl record as the reader will; True when it holds text."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg}, column {e.colno}). "
                        "Each line must be one JSON object.") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: a JSON {type(obj).__name__}, not an object. Each line must be one JSON object "
                        f"with the text under '{text_key}' ({key}.text_key).")
    if text_key not in obj:
        fields = f"its fields: {', '.join(repr(k) for k in list(obj)[:8])}" if obj else "it has no fields"
        raise UserError(f"{where}: no field '{text_key}' in this record ({fields}). "
                        f"Set {key}.text_key to the field that holds the text.")
    text = obj[text_key]
    if not isinstance(text, str):
        raise UserError(f"{where}: field '{text_key}' is a {type(text).__name__}, not a string.")
    return bool(text.strip())
