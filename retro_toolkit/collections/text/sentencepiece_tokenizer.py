"""The SentencePiece decoder tokenizer, trained on the corpus or given.

Special ids are fixed when we train (pad 0, unk 1, bos 2, eos 3); eos doubles as the
end-of-document token between documents of a token stream. A given model keeps its own
ids; a missing pad falls back to eos.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Iterable

from retro_toolkit.collections.text.tokenizer import SP_FILE, Tokenizer
from retro_toolkit.core.dist import usable_cpus
from retro_toolkit.errors import UserError


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, model_file: str | os.PathLike, model_proto: bytes | None = None) -> None:
        """model_file: a SentencePiece .model; with model_proto (its bytes) it only names the source."""
        import sentencepiece as spm

        self.name = str(model_file)
        try:
            self.proto = model_proto if model_proto is not None else Path(model_file).read_bytes()
            self.sp = spm.SentencePieceProcessor(model_proto=self.proto)
        except (OSError, RuntimeError) as e:
            why = "it does not parse as one" if "ParseFromArray" in str(e) else (str(e).splitlines() or ["?"])[0]
            raise UserError(f"cannot load SentencePiece model {model_file}: {why}. Give a SentencePiece .model, or "
                            "a Hugging Face tokenizer's folder.") from None
        self.vocab_size: int = self.sp.get_piece_size()
        self.eod_id: int = self.sp.eos_id()
        if self.eod_id < 0:
            raise UserError(f"SentencePiece model {model_file} has no end-of-sentence id; retrain it with eos_id set.")
        self.pad_id: int = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eod_id
        self.bos_id: int = self.sp.bos_id()
        self.unk_id: int = self.sp.unk_id()

    @classmethod
    def from_bytes(cls, data: bytes, name: str) -> "SentencePieceTokenizer":
        """A tokenizer from a .model file's bytes (e.g. a .nemo artifact); name is for messages."""
        return cls(name, model_proto=data)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, out_type=int, num_threads=usable_cpus())

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def files(self) -> dict[str, bytes]:
        return {SP_FILE: self.proto}

    @property
    def sha256(self) -> str:  # the file's own hash, as work directories and checkpoints have always recorded
        return hashlib.sha256(self.proto).hexdigest()


def _lines(texts: Iterable[str]) -> Iterable[str]:
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def train_sentencepiece(
    texts: Iterable[str],
    out_file: Path,
    vocab_size: int,
    model_type: str,
    character_coverage: float,
    max_lines: int,
    byte_fallback: bool,
    seed: int,
) -> None:
    """Train on the lines of `texts`; write the .model to `out_file` (caller makes it atomic)."""
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    # SentencePiece turns an exception raised by the iterator into a RuntimeError; keep
    # the original (e.g. a UserError naming a bad file) and raise that instead.
    reader_error: list[BaseException] = []

    def lines() -> Iterable[str]:
        try:
            yield from _lines(texts)
        except Exception as e:
            reader_error.append(e)
            raise

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines()),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            input_sentence_size=max_lines,
            shuffle_input_sentence=True,
            # identity + kept whitespace: decode(encode(text)) gives the text back, which
            # the retrieval embedder (it re-tokenises decoded chunks for BERT) relies on.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=1 << 16,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            num_threads=usable_cpus(),
            minloglevel=2,
        )
    except RuntimeError as e:
        if reader_error:
            raise reader_error[0] from None
        msg = str(e).strip().splitlines()[-1].split("] ")[-1]  # drop "INTERNAL: src/x.cc(744) [...]"
        if "Vocabulary size" in msg or "vocab_size" in msg:
            raise UserError(
                f"tokenizer.vocab_size = {vocab_size} does not fit this corpus (SentencePiece: {msg}). "
                "Change tokenizer.vocab_size, or add text to data.sources."
            ) from None
        raise
    out_file.write_bytes(model.getvalue())
