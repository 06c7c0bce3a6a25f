"""Corpus readers: the documents of each kind of `data.sources` entry (shards.py cuts a source
into read shards, corpus_layout.py reads them in recipe order and skips empty documents).

Formats (formats.py says which reader a path takes): .jsonl, .jsonl.gz and .jsonl.zst (one
JSON object per line, text under `text_key`), a .txt file (one document), .parquet and .arrow
files and Hugging Face datasets folders (one document per row of column `text_key`), Megatron
indexed datasets (documents of token ids, megatron_indexed.py), folders of any of these (a .txt
file in a folder is one document), and builtins: `builtin:pydoc` (CPython's pydoc topics),
`builtin:python-stdlib` (the running Python's standard-library modules, Lib/*.py: source code,
no install), `builtin:transformers-modeling` (the PyTorch modeling files of the installed
transformers, a dependency) and `builtin:wiki-sample` (gensim's sample of Wikipedia, from the
[demo] extra).

A document is text (str) or, from a Megatron indexed dataset, token ids (a numpy array).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np

from retro_toolkit.collections.text import formats
from retro_toolkit.collections.text.builtin_sources import check_builtin
from retro_toolkit.collections.text.decoding import ReadStats, decode
from retro_toolkit.collections.text.source_probe import probe_content
from retro_toolkit.errors import UserError

Document = Union[str, np.ndarray]


def check_source(src: Any, key: str, on_invalid_utf8: str | None = None) -> None:
    """Fail before anything is written when a source cannot be read. With `on_invalid_utf8`
    (the recipe's data.on_invalid_utf8), also read the start of each file: empty corpora,
    bad UTF-8, .jsonl records without the text field and tables without the text column are
    refused before a job exists."""
    path = src.path
    if path.startswith("builtin:"):
        check_builtin(path, key)
        return
    p = Path(path)
    kind = formats.kind_of(p)
    if kind is None:
        if not p.exists():
            raise UserError(f"{key}.path: corpus path {p} does not exist. Fix the path in the recipe or with "
                            f"{key}.path=...")
        raise UserError(f"{key}.path: {p} is not a corpus format this toolkit reads. Give {formats.SUPPORTED}.")
    if kind == "folder" and not formats.folder_files(p):
        raise UserError(f"{key}.path: folder {p} holds no corpus file. Give {formats.SUPPORTED}.")
    if kind == "megatron":
        from retro_toolkit.collections.text.megatron_indexed import IndexedDataset, prefix_of

        IndexedDataset(prefix_of(p), key)
    elif kind in ("parquet", "arrow"):
        formats.check_text_column(formats.columnar_schema(p, kind), p, src.text_key, key)
    elif kind == "hf_dataset":
        for f in formats.hf_dataset_files(p, key)[:1]:
            formats.check_text_column(formats.columnar_schema(f, "arrow"), f, src.text_key, key)
    if on_invalid_utf8 is not None and kind in ("jsonl", "txt", "folder"):
        probe_content(p, src.text_key, key, on_invalid_utf8)


def megatron_sources(sources: Any) -> list[tuple[int, Path]]:
    """(source index, prefix) of every Megatron indexed dataset (token ids, not text) among the
    sources and inside folder sources."""
    from retro_toolkit.collections.text.megatron_indexed import prefix_of

    out = []
    for i, s in enumerate(sources):
        p = Path(s.path)
        kind = None if s.path.startswith("builtin:") else formats.kind_of(p)
        if kind == "megatron":
            out.append((i, prefix_of(p)))
        elif kind == "folder":
            out += [(i, f) for f, k in formats.folder_files(p) if k == "megatron"]
    return out


def check_token_sources(sources: Any, tok, key_prefix: str = "data.sources", fix: str | None = None) -> None:
    """Megatron indexed datasets hold ids: the tokenizer must be the one that wrote them."""
    from retro_toolkit.collections.text.megatron_indexed import FIX, IndexedDataset, check_tokenizer

    for i, prefix in megatron_sources(sources):
        check_tokenizer(IndexedDataset(prefix, f"{key_prefix}[{i}]"), tok, f"{key_prefix}[{i}]", fix=fix or FIX)


def encode_documents(tok, docs: list[Document]) -> list[list[int]]:
    """Token ids of each document, without the end-of-document token: text is encoded (in one
    batch), ids pass through (an EOS they end in, as preprocess_data.py --append-eod writes, dropped)."""
    texts = [d for d in docs if isinstance(d, str)]
    encoded = iter(tok.encode(texts) if texts else [])
    out = []
    for d in docs:
        if isinstance(d, str):
            out.append(next(encoded))
        else:
            if len(d) and (int(d.max()) >= tok.vocab_size or int(d.min()) < 0):
                raise UserError(f"a Megatron indexed dataset holds token id {int(d.max()) if d.max() > 0 else int(d.min())}"
                                f", outside the tokenizer's vocabulary (0..{tok.vocab_size - 1}): set tokenizer.model "
                                "to the one that wrote it.")
            ids = d.tolist()
            out.append(ids[:-1] if ids and ids[-1] == tok.eod_id else ids)
    return out


def jsonl_records(lines: Iterator[tuple[bytes, str]], text_key: str, key: str, policy: str,
                  stats: ReadStats) -> Iterator[tuple[str, str]]:
    """(text, where) of .jsonl lines given as (raw line, where)."""
    for raw, where in lines:
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


def _jsonl(path: Path, text_key: str, key: str, policy: str, stats: ReadStats) -> Iterator[tuple[str, str]]:
    lines = ((raw, f"{path}:{n}") for n, raw in enumerate(formats.read_lines(path), 1))
    yield from jsonl_records(lines, text_key, key, policy, stats)


def _txt(path: Path, policy: str, stats: ReadStats) -> Iterator[tuple[str, str]]:
    yield decode(path.read_bytes(), str(path), policy, stats), str(path)


def file_documents(p: Path, kind: str, text_key: str, key: str, policy: str,
                   stats: ReadStats) -> Iterator[tuple[Document, str]]:
    """A whole .jsonl (compressed too), .txt or .arrow file (shards.py reads the other kinds)."""
    if kind == "jsonl":
        yield from _jsonl(p, text_key, key, policy, stats)
    elif kind == "txt":
        yield from _txt(p, policy, stats)
    else:
        yield from ((t or "", where) for t, where in formats.arrow_texts(p, text_key, key))


def is_empty(doc: Document, eod_id: Optional[int] = None) -> bool:
    """Blank text; token ids that are nothing or only an end-of-document (a builder that appends
    one to every document, even an empty one, writes that)."""
    if isinstance(doc, np.ndarray):
        return len(doc) == 0 or (eod_id is not None and len(doc) == 1 and int(doc[0]) == eod_id)
    return not doc.strip()
