"""Stage `prepare_corpus`: tokenize the corpus into train/valid/test token streams.

Its section is `data:`, which the tokenizer and the database read too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from retro_toolkit.collections.text.splits import SPLIT_BY
from retro_toolkit.errors import UserError
from retro_toolkit.recipe.fields import WHY_BATCH, WHY_COUNT, bounded, filepath
from retro_toolkit.stages.spec import StageSpec


@dataclass
class SourceConfig:
    # A .jsonl file (one JSON object per line), a .txt file (one document), a folder of
    # .txt files (one document each), or a builtin: builtin:pydoc (CPython's pydoc topics),
    # builtin:python-stdlib (this Python's standard-library modules, Lib/*.py, as source code),
    # builtin:transformers-modeling (the installed transformers' models/*/modeling_*.py)
    # or builtin:wiki-sample (gensim's 105 Wikipedia articles; install retro-toolkit[demo]).
    path: str = filepath("???")
    # Field holding the document text in .jsonl sources.
    text_key: str = "text"
    # Read at most this many non-empty documents from the source (None = all).
    max_docs: Optional[int] = bounded(None, 1, 10**12, WHY_COUNT)


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    # Fractions of each source's documents for train / valid / test, in document order.
    split: list[float] = field(default_factory=lambda: [0.98, 0.01, 0.01])
    # What the split deals out: whole "document"s (contiguous ranges per source), or
    # "passage"s (documents cut at blank lines into ~passage_chars pieces, interleaved):
    # valid/test are then unseen passages of documents whose other passages are trained on.
    split_by: Literal[SPLIT_BY] = "document"
    passage_chars: int = bounded(2000, 1, 10**9, "a passage of a billion characters is a typo")
    # What to do with bytes that are not UTF-8: "error" (name file and line) or "replace".
    on_invalid_utf8: Literal["error", "replace"] = "error"
    # Documents tokenized per batch (memory vs. speed; does not change the output).
    tokenize_batch_docs: int = bounded(256, 1, 10**7, WHY_BATCH)


def source_paths(r) -> list[tuple[str, str]]:
    return [(f"data.sources[{i}].path", s.path) for i, s in enumerate(r.data.sources)]


def check_sources(r) -> None:
    """Every corpus source can be read, and its start is text the recipe accepts."""
    from retro_toolkit.collections.text.sources import check_source

    if not r.data.sources:
        raise UserError("data.sources is empty: name at least one corpus (e.g. data=pydoc, or a .jsonl path).")
    for i, src in enumerate(r.data.sources):
        check_source(src, f"data.sources[{i}]", r.data.on_invalid_utf8)


def check(r: dict[str, Any]) -> None:
    split = r["data"]["split"]
    if len(split) != 3 or any(x < 0 for x in split) or abs(sum(split) - 1.0) > 1e-6:
        raise UserError(
            f"recipe key 'data.split' = {split} must be three non-negative fractions "
            "(train, valid, test) that sum to 1, e.g. [0.9, 0.05, 0.05]."
        )


# Version 2: each source split on its own (every split holds every source).
STAGE = StageSpec("prepare_corpus", "data", depends_on=("tokenizer",), config_keys=("data",),
                  entry="retro_toolkit.collections.text.prepare_corpus:run", summary=__doc__, version=2,
                  added_keys=(("data.split_by", "document"), ("data.passage_chars", 2000)), check=check,
                  preflight=check_sources, reads=source_paths)
