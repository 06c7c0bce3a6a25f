"""Stage `prepare_corpus`: tokenize the corpus into train/valid/test token streams.

Its section is `data:`, which the tokenizer and the database read too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from retro_toolkit.collections.text.splits import SPLIT_BY
from retro_toolkit.errors import UserError
from retro_toolkit.recipe.fields import WHY_BATCH, WHY_COUNT, bounded, filepath
from retro_toolkit.stages.spec import StageSpec


@dataclass
class SourceConfig:
    # A .jsonl / .jsonl.gz / .jsonl.zst file (one JSON object per line), a .txt file (one
    # document), a .parquet or .arrow file or a Hugging Face datasets folder (save_to_disk; one
    # document per row), a Megatron indexed dataset (PREFIX of PREFIX.bin + PREFIX.idx: token
    # ids, written with the recipe's tokenizer), a folder of any of these (a .txt file in it is
    # one document), or a builtin: builtin:pydoc (CPython's pydoc topics),
    # builtin:python-stdlib (this Python's standard-library modules, Lib/*.py, as source code),
    # builtin:transformers-modeling (the installed transformers' models/*/modeling_*.py)
    # or builtin:wiki-sample (gensim's 105 Wikipedia articles; install retro-toolkit[demo]).
    path: str = filepath("???")
    # Field (.jsonl) or column (.parquet, .arrow, datasets) holding the document text.
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
    # Size of the read shards (MiB) that ranks share out: byte ranges of .jsonl, row groups of
    # Parquet, document ranges of Megatron datasets (does not change the output).
    shard_mb: int = bounded(256, 1, 1 << 20, "a shard of more than a TiB is one no rank can share")


def source_paths(r) -> list[tuple[str, str]]:
    return [(f"data.sources[{i}].path", s.path) for i, s in enumerate(r.data.sources)]


def check_sources(r) -> None:
    """Every corpus source can be read, and its start is text the recipe accepts."""
    from retro_toolkit.collections.text.sources import check_source

    if not r.data.sources:
        raise UserError("data.sources is empty: name at least one corpus (e.g. data=pydoc, or a .jsonl path).")
    for i, src in enumerate(r.data.sources):
        check_source(src, f"data.sources[{i}]", r.data.on_invalid_utf8)
    check_token_ids(r, r.data.sources, "data.sources")


def check_token_ids(r, sources, key: str) -> None:
    """Megatron indexed datasets hold token ids: they need the tokenizer that wrote them, given."""
    from retro_toolkit.collections.text.sources import check_token_sources, megatron_sources
    from retro_toolkit.collections.text.tokenizer import open_tokenizer

    ids = megatron_sources(sources)
    if not ids:
        return
    where = f"{key}[{ids[0][0]}]"
    if key != "data.sources" and not r.tokenizer.model and (Path(r.workdir) / "tokenizer").is_dir():
        from retro_toolkit.collections.text.tokenizer import workdir_tokenizer

        check_token_sources(sources, workdir_tokenizer(r.workdir), key,  # the one the database was built with
                            f"Write it again with this work directory's tokenizer ({Path(r.workdir) / 'tokenizer'}), "
                            "or give that corpus as text, which build_db tokenizes itself. Nothing was changed.")
        return
    if not r.tokenizer.model:
        raise UserError(f"{where} is a Megatron indexed dataset ({ids[0][1]}): token ids, not text, so no "
                        "tokenizer can be trained on it. Set tokenizer.model to the tokenizer that wrote it.")
    if key == "data.sources" and r.data.split_by == "passage":
        raise UserError(f"{where} is a Megatron indexed dataset: its documents are token ids, which "
                        "data.split_by=passage cannot cut at blank lines. Use data.split_by=document.")
    check_token_sources(sources, open_tokenizer(r.tokenizer.model), key)


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
                  added_keys=(("data.split_by", "document"), ("data.passage_chars", 2000), ("data.shard_mb", 256)), check=check,
                  preflight=check_sources, reads=source_paths)
