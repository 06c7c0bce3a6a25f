"""Corpus readers: yield the non-empty documents of a recipe's `data.sources`, in order.

Formats: .jsonl (one JSON object per line, text under `text_key`), a .txt file (one
document), a folder of .txt files (one document each, sorted by path), and builtins:
`builtin:pydoc` (CPython's pydoc topics), `builtin:python-stdlib` (the running Python's
standard-library modules, Lib/*.py: source code, no install), `builtin:transformers-modeling`
(the PyTorch modeling files of the installed transformers, a dependency) and
`builtin:wiki-sample` (gensim's sample of Wikipedia, from the [demo] extra).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from retro_toolkit.collections.text.builtin_sources import builtin_documents, check_builtin
from retro_toolkit.collections.text.decoding import ReadStats, decode
from retro_toolkit.collections.text.source_probe import probe_content
from retro_toolkit.collections.text.splits import cut_passages
from retro_toolkit.errors import UserError


def check_source(src: Any, key: str, on_invalid_utf8: str | None = None) -> None:
    """Fail before anything is written when a source cannot be read. With `on_invalid_utf8`
    (the recipe's data.on_invalid_utf8), also read the start of each file: empty corpora,
    bad UTF-8 and .jsonl records without the text field are refused before a job exists."""
    path = src.path
    if path.startswith("builtin:"):
        check_builtin(path, key)
        return
    p = Path(path)
    if not p.exists():
        raise UserError(f"{key}.path: corpus path {p} does not exist. Fix the path in the recipe or with {key}.path=...")
    if p.is_dir() and not any(p.rglob("*.txt")):
        raise UserError(f"{key}.path: folder {p} has no .txt files (a folder source reads one document per .txt file).")
    if not p.is_dir() and not p.is_file():
        raise UserError(f"{key}.path: {p} is neither a regular file nor a folder; point at a .jsonl or .txt file.")
    if p.is_file() and p.suffix not in (".jsonl", ".txt"):
        raise UserError(f"{key}.path: {p} is neither .jsonl nor .txt; convert it, or point at a folder of .txt files.")
    if on_invalid_utf8 is not None:
        probe_content(p, src.text_key, key, on_invalid_utf8)


def _jsonl(path: Path, text_key: str, key: str, policy: str, stats: ReadStats) -> Iterator[tuple[str, str]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            line = decode(raw, where, policy, stats).strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg}, column {e.colno}). Each line must be one JSON object.") from None
            if not isinstance(obj, dict) or text_key not in obj:
                raise UserError(
                    f"{where}: no field '{text_key}' in this record. Set {key}.text_key to the field that holds the text."
                )
            text = obj[text_key]
            if not isinstance(text, str):
                raise UserError(f"{where}: field '{text_key}' is a {type(text).__name__}, not a string.")
            yield text, where


def _txt_files(path: Path, policy: str, stats: ReadStats) -> Iterator[tuple[str, str]]:
    files = [path] if path.is_file() else sorted(path.rglob("*.txt"))
    for p in files:
        yield decode(p.read_bytes(), str(p), policy, stats), str(p)


def iter_documents(
    sources: Any,
    on_invalid_utf8: str,
    stats: ReadStats | None = None,
    key_prefix: str = "data.sources",
    passage_chars: int | None = None,
) -> Iterator[tuple[str, str]]:
    """(text, origin) for every non-empty document of every source, in recipe order; with
    passage_chars, for every passage of those documents (`splits.cut_passages`), and
    stats.per_source counts passages (max_docs still counts documents)."""
    stats = stats if stats is not None else ReadStats()
    for i, src in enumerate(sources):
        key = f"{key_prefix}[{i}]"
        check_source(src, key)
        if src.path.startswith("builtin:"):
            docs = builtin_documents(src.path, on_invalid_utf8, stats)
        elif src.path.endswith(".jsonl"):
            docs = _jsonl(Path(src.path), src.text_key, key, on_invalid_utf8, stats)
        else:
            docs = _txt_files(Path(src.path), on_invalid_utf8, stats)
        n = docs_read = 0
        for text, origin in docs:
            if not text.strip():
                stats.empty_skipped += 1
                continue
            docs_read += 1
            if passage_chars is None:
                yield text, origin
                n += 1
            else:
                for j, passage in enumerate(cut_passages(text, passage_chars)):
                    yield passage, f"{origin}@passage{j}"
                    n += 1
            if src.max_docs is not None and docs_read >= src.max_docs:
                break
        stats.per_source.append(n)
