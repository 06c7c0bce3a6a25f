"""Stage `tokenizer`: train (or load) the decoder's SentencePiece tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from retro_toolkit.errors import UserError
from retro_toolkit.recipe.fields import INT32, VOCAB, WHY_VOCAB, bounded, filepath
from retro_toolkit.stages.prepare_corpus import check_sources, source_paths
from retro_toolkit.stages.spec import StageSpec


@dataclass
class TokenizerConfig:
    # An existing SentencePiece .model to use as is; null = train one on the corpus.
    model: Optional[str] = filepath(None)
    vocab_size: int = bounded(8000, 16, VOCAB, WHY_VOCAB)
    # SentencePiece model type when training: unigram or bpe.
    model_type: Literal["unigram", "bpe"] = "unigram"
    character_coverage: float = 0.9995
    # Lines sampled from the corpus to train on (SentencePiece input_sentence_size).
    train_max_lines: int = bounded(1_000_000, 1, INT32, "far more lines than SentencePiece can hold in memory")
    # Unknown characters fall back to bytes, so any text round-trips.
    byte_fallback: bool = True


def _reads(r) -> list[tuple[str, Any]]:
    return [("tokenizer.model", r.tokenizer.model)] if r.tokenizer.model else source_paths(r)


def _preflight(r) -> None:
    if not r.tokenizer.model:
        if "prepare_corpus" not in r.stages:  # that stage's preflight reads the same sources
            check_sources(r)
    elif not Path(r.tokenizer.model).is_file():
        raise UserError(f"tokenizer.model: SentencePiece model {r.tokenizer.model} does not exist. "
                        "Fix the path, or set tokenizer.model=null to train one on the corpus.")


STAGE = StageSpec("tokenizer", "tokenizer", depends_on=(),
                  config_keys=("tokenizer", "data.sources", "data.on_invalid_utf8"),
                  entry="retro_toolkit.collections.text.tokenizer_stage:run", summary=__doc__,
                  preflight=_preflight, reads=_reads)
