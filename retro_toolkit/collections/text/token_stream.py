"""A split's token stream on disk: documents back to back, each followed by EOD.

    corpus/<split>.bin       tokens, uint16 when the vocabulary fits, else uint32
    corpus/<split>.idx.npy   int64 [num_docs + 1]: document i is tokens[idx[i]:idx[i+1]]
                             (its trailing EOD included)
    corpus/meta.json         dtype, vocabulary, special ids, per-split counts

The .bin is read through a memory map, so opening a stream costs nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from retro_toolkit.core import files
from retro_toolkit.errors import UserError

SPLITS = ("train", "valid", "test")
CORPUS_DIR = "corpus"


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def bin_path(corpus_dir: str | os.PathLike, split: str) -> Path:
    return Path(corpus_dir) / f"{split}.bin"


def idx_path(corpus_dir: str | os.PathLike, split: str) -> Path:
    return Path(corpus_dir) / f"{split}.idx.npy"


class TokenStream:
    def __init__(self, corpus_dir: str | os.PathLike, split: str) -> None:
        corpus_dir = Path(corpus_dir)
        meta_file = corpus_dir / "meta.json"
        if not meta_file.is_file():
            raise UserError(
                f"no prepared corpus in {corpus_dir} (missing meta.json): run the prepare_corpus stage first."
            )
        self.meta = files.read_json(meta_file)
        self.split = split
        self.doc_offsets = np.load(idx_path(corpus_dir, split), mmap_mode="r")  # paged in as read
        n = int(self.doc_offsets[-1])
        dtype = np.dtype(self.meta["dtype"])
        size = bin_path(corpus_dir, split).stat().st_size
        if size != n * dtype.itemsize:
            raise UserError(
                f"{bin_path(corpus_dir, split)} holds {size} bytes but its index expects {n * dtype.itemsize}: "
                "the corpus is damaged; rerun with --force prepare_corpus."
            )
        self.tokens = (
            np.memmap(bin_path(corpus_dir, split), dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
        )

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_docs(self) -> int:
        return len(self.doc_offsets) - 1

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.doc_offsets[i] : self.doc_offsets[i + 1]]
