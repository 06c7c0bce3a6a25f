"""The builtin corpora a recipe names as `builtin:*`: `builtin:pydoc` (CPython's pydoc
topics), `builtin:python-stdlib` (the running Python's top-level standard-library modules),
`builtin:transformers-modeling` (the installed transformers' PyTorch modeling files) and
`builtin:wiki-sample` (gensim's sample of Wikipedia, from the [demo] extra). Each yields
(text, origin) pairs, origin as `builtin:<name>#<document>`."""

from __future__ import annotations

import bz2
from pathlib import Path
from typing import Iterator

from retro_toolkit.collections.text.decoding import ReadStats, decode
from retro_toolkit.errors import UserError

BUILTINS = ("builtin:pydoc", "builtin:python-stdlib", "builtin:transformers-modeling", "builtin:wiki-sample")
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def check_builtin(path: str, key: str) -> None:
    """Fail when `path` names no builtin corpus, or one this install cannot read."""
    if path not in BUILTINS:
        raise UserError(f"{key}.path = '{path}' is not a builtin corpus; builtins: {', '.join(BUILTINS)}.")
    if path == "builtin:wiki-sample":
        _wiki_path()
    if path == "builtin:python-stdlib":
        _stdlib_dir()
    if path == "builtin:transformers-modeling":
        _modeling_files()


def builtin_documents(path: str, policy: str, stats: ReadStats) -> Iterator[tuple[str, str]]:
    """(text, origin) of every document of the builtin corpus `path` (one that check_builtin passed)."""
    if path == "builtin:pydoc":
        return _pydoc()
    if path == "builtin:wiki-sample":
        return _wiki_sample()
    if path == "builtin:python-stdlib":
        return _python_stdlib(policy, stats)
    return _transformers_modeling(policy, stats)


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
        yield decode(p.read_bytes(), str(p), policy, stats), f"builtin:python-stdlib#{p.name}"


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
        yield decode(p.read_bytes(), str(p), policy, stats), f"builtin:transformers-modeling#{p.parent.name}/{p.name}"


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
