"""Corpus readers: yield the non-empty documents of a recipe's `data.sources`, in order.

Formats: .jsonl (one JSON object per line, text under `text_key`), a .txt file (one
document), a folder of .txt files (one document each, sorted by path), and builtins:
`builtin:pydoc` (CPython's pydoc topics), `builtin:python-stdlib` (the running Python's
standard-library modules, Lib/*.py: source code, no install), `builtin:transformers-modeling`
(the PyTorch modeling files of the installed transformers, a dependency) and
`builtin:wiki-sample` (gensim's sample of Wikipedia, from the [demo] extra).
"""

from __future__ import annotations

import bz2
import codecs
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from retro_toolkit.collections.text.splits import cut_passages
from retro_toolkit.errors import UserError

BUILTINS = ("builtin:pydoc", "builtin:python-stdlib", "builtin:transformers-modeling", "builtin:wiki-sample")
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


@dataclass
class ReadStats:
    empty_skipped: int = 0
    invalid_utf8_replaced: int = 0
    per_source: list[int] = field(default_factory=list)


def _wiki_path() -> Path:
    try:
        import gensim
    except ImportError:
        raise UserError(
            "builtin:wiki-sample needs gensim's bundled test data: pip install 'retro-toolkit[demo]'."
        ) from None
    p = Path(gensim.__file__).parent / "test" / "test_data" / _WIKI_FILE
    if not p.is_file():
        raise UserError(f"builtin:wiki-sample: {p} is missing from this gensim install; reinstall gensim.")
    return p


def check_source(src: Any, key: str, on_invalid_utf8: str | None = None) -> None:
    """Fail before anything is written when a source cannot be read. With `on_invalid_utf8`
    (the recipe's data.on_invalid_utf8), also read the start of each file: empty corpora,
    bad UTF-8 and .jsonl records without the text field are refused before a job exists."""
    path = src.path
    if path.startswith("builtin:"):
        if path not in BUILTINS:
            raise UserError(f"{key}.path = '{path}' is not a builtin corpus; builtins: {', '.join(BUILTINS)}.")
        if path == "builtin:wiki-sample":
            _wiki_path()
        if path == "builtin:python-stdlib":
            _stdlib_dir()
        if path == "builtin:transformers-modeling":
            _modeling_files()
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
        _probe_content(p, src.text_key, key, on_invalid_utf8)


# How much of a corpus the up-front check reads: enough to catch a wrong file or a wrong
# text_key at once, little enough that a multi-GB corpus costs milliseconds.
PROBE_BYTES = 4 << 20
PROBE_RECORDS = 100
PROBE_FILES = 100


def _probe_content(p: Path, text_key: str, key: str, policy: str) -> None:
    try:
        if p.is_dir():
            _probe_txt_folder(p, key, policy)
        elif p.suffix == ".jsonl":
            _probe_jsonl(p, text_key, key, policy)
        else:
            _probe_txt(p, key, policy)
    except OSError as e:
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
    budget, records, lineno, seen_text, at_end = PROBE_BYTES, 0, 0, False, False
    with open(path, "rb") as f:
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


def _decode(raw: bytes, where: str, policy: str, stats: ReadStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if policy == "replace":
            stats.invalid_utf8_replaced += 1
            return raw.decode("utf-8", errors="replace")
        line = raw.count(b"\n", 0, e.start)
        at = where if line == 0 else f"{where} (line {line + 1} of the document)"
        raise UserError(
            f"{at}: invalid UTF-8 at byte {e.start} ({raw[e.start:e.start + 4]!r}). Fix the file, or set "
            "data.on_invalid_utf8=replace to replace bad bytes with U+FFFD."
        ) from None


def _jsonl(path: Path, text_key: str, key: str, policy: str, stats: ReadStats) -> Iterator[tuple[str, str]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            line = _decode(raw, where, policy, stats).strip()
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
        yield _decode(p.read_bytes(), str(p), policy, stats), str(p)


def _pydoc() -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name], f"builtin:pydoc#{name}"


def _stdlib_dir() -> Path:
    import sysconfig

    p = Path(sysconfig.get_paths()["stdlib"])
    if not any(p.glob("*.py")):
        raise UserError(
            f"builtin:python-stdlib: {p} holds no .py files (this Python ships its standard library compiled "
            "only); use another Python or a folder source."
        )
    return p


def _python_stdlib(policy: str, stats: ReadStats) -> Iterator[tuple[str, str]]:
    # Top-level modules only: the packages under Lib/ (test/, idlelib/, ...) would make the
    # corpus 30 times larger and mostly tests.
    for p in sorted(_stdlib_dir().glob("*.py")):
        yield _decode(p.read_bytes(), str(p), policy, stats), f"builtin:python-stdlib#{p.name}"


def _modeling_files() -> list[Path]:
    import transformers

    root = Path(transformers.__file__).parent / "models"
    # TensorFlow and Flax ports (transformers < 5) would repeat each model in another framework.
    files = [p for p in sorted(root.glob("*/modeling_*.py")) if not p.name.startswith(("modeling_tf_", "modeling_flax_"))]
    if not files:
        raise UserError(
            f"builtin:transformers-modeling: no models/*/modeling_*.py under {root.parent} (transformers "
            f"{transformers.__version__}); reinstall transformers, or use a folder source."
        )
    return files


def _transformers_modeling(policy: str, stats: ReadStats) -> Iterator[tuple[str, str]]:
    for p in _modeling_files():
        yield _decode(p.read_bytes(), str(p), policy, stats), f"builtin:transformers-modeling#{p.parent.name}/{p.name}"


def _wiki_sample() -> Iterator[tuple[str, str]]:
    import xml.etree.ElementTree as ET

    from gensim.corpora.wikicorpus import filter_wiki

    with bz2.open(_wiki_path(), "rb") as f:
        title = None
        for _, elem in ET.iterparse(f, events=("end",)):
            tag = elem.tag.rsplit("}", 1)[-1]
            if tag == "title":
                title = elem.text or ""
            elif tag == "text":
                raw = elem.text or ""
                if not raw.lstrip().upper().startswith("#REDIRECT"):
                    body = filter_wiki(raw)
                    yield f"{title}\n\n{body}", f"builtin:wiki-sample#{title}"
            elif tag == "page":
                elem.clear()


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
        if src.path == "builtin:pydoc":
            docs = _pydoc()
        elif src.path == "builtin:wiki-sample":
            docs = _wiki_sample()
        elif src.path == "builtin:python-stdlib":
            docs = _python_stdlib(on_invalid_utf8, stats)
        elif src.path == "builtin:transformers-modeling":
            docs = _transformers_modeling(on_invalid_utf8, stats)
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

