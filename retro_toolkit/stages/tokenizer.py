"""Stage `tokenizer`: train the decoder's SentencePiece tokenizer, or take a given SentencePiece or
Hugging Face tokenizer."""

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
    # An existing tokenizer to use as is: a SentencePiece .model, a Hugging Face tokenizer.json, or
    # the folder save_pretrained wrote (tokenizer.json + tokenizer_config.json, whose eos_token ends
    # documents). null = train a SentencePiece model on the corpus.
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
    elif not Path(r.tokenizer.model).exists():
        raise UserError(f"tokenizer.model: {r.tokenizer.model} does not exist. Give a SentencePiece .model, a "
                        "Hugging Face tokenizer.json or its folder, or set tokenizer.model=null to train one on "
                        "the corpus.")
    else:  # a file that is no tokenizer, or special tokens missing, fails before any work directory exists
        from retro_toolkit.collections.text.tokenizer import open_tokenizer

        open_tokenizer(r.tokenizer.model)


STAGE = StageSpec("tokenizer", "tokenizer", depends_on=(),
                  config_keys=("tokenizer", "data.sources", "data.on_invalid_utf8"),
                  entry="retro_toolkit.collections.text.tokenizer_stage:run", summary=__doc__,
                  preflight=_preflight, reads=_reads)
