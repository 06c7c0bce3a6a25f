"""The recipe schema: one dataclass per section.

OmegaConf merges the composed YAML into these, which gives type checks and unknown-key
errors for free; `validate.py` turns its exceptions into messages a user can act on.
Every field's comment is what `retro-run show` users read to learn a key, so keep them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

STAGE_NAMES = (
    "tokenizer",
    "prepare_corpus",
    "build_db",
    "pretrain",
    "eval_ppl",
    "sft",
    "eval_qa",
    "export",
)


@dataclass
class SourceConfig:
    # A .jsonl file (one JSON object per line), a .txt file (one document), a folder of
    # .txt files (one document each), or a builtin: builtin:pydoc (CPython's pydoc topics)
    # or builtin:wiki-sample (gensim's 105 Wikipedia articles; install retro-toolkit[demo]).
    path: str = MISSING
    # Field holding the document text in .jsonl sources.
    text_key: str = "text"
    # Read at most this many non-empty documents from the source (None = all).
    max_docs: Optional[int] = None


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    # Fractions of documents for train / valid / test, in document order.
    split: list[float] = field(default_factory=lambda: [0.98, 0.01, 0.01])
    # What to do with bytes that are not UTF-8: "error" (name file and line) or "replace".
    on_invalid_utf8: str = "error"
    # Documents tokenized per batch (memory vs. speed; does not change the output).
    tokenize_batch_docs: int = 256


@dataclass
class TokenizerConfig:
    # An existing SentencePiece .model to use as is; null = train one on the corpus.
    model: Optional[str] = None
    vocab_size: int = 8000
    # SentencePiece model type when training: unigram or bpe.
    model_type: str = "unigram"
    character_coverage: float = 0.9995
    # Lines sampled from the corpus to train on (SentencePiece input_sentence_size).
    train_max_lines: int = 1_000_000
    # Unknown characters fall back to bytes, so any text round-trips.
    byte_fallback: bool = True


@dataclass
class ModelConfig:
    # "retro" (decoder with chunked cross-attention + neighbour encoder) or "gpt" (its twin).
    arch: str = "retro"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: int = 128
    seq_length: int = 256
    # Retro: chunk length m, neighbours per chunk k, chunks retrieved per neighbour
    # (r = num_retrieved_chunks * chunk_length tokens: the chunk plus its continuation).
    chunk_length: int = 64
    num_neighbors: int = 2
    num_retrieved_chunks: int = 2
    encoder_num_layers: int = 2
    # 1-based decoder layers with chunked cross-attention; null = the Retro rule.
    cca_layers: Optional[list[int]] = None


@dataclass
class Recipe:
    name: str = MISSING
    description: str = ""
    # Work directory owned by this recipe; every stage reads and writes only there.
    workdir: str = "./runs/${name}"
    seed: int = 1234
    # Stages this recipe runs, in any order (the runner orders them by dependency).
    stages: list[str] = MISSING
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # Checked against the executor schema chosen by executor.type (see executors.py).
    executor: Any = field(default_factory=lambda: {"type": "local"})
