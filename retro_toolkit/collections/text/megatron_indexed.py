"""Megatron indexed datasets (`PREFIX.bin` + `PREFIX.idx`, as Megatron-LM's preprocess_data.py and
megatron-core's IndexedDatasetBuilder write them) as a corpus source of token ids.

The .idx file: the magic b"MMIDIDX\\x00\\x00", version (u64, 1), token dtype code (u8), the
sequence count S and document count D+1 (u64 each), then S int32 sequence lengths, S int64
byte offsets into .bin, D+1 int64 sequence indices bounding the documents (and, in multimodal
files, S int8 modes, not read). Both files are memory-mapped: a document is read when it is
reached, so a 10^12-token dataset costs its page cache, not its size in RAM.

The documents are token ids already: the recipe's tokenizer must be the one that wrote them
(`check_tokenizer` refuses ids past its vocabulary, or text that does not re-encode to them).
"""

from __future__ import annotations

import difflib
import struct
from pathlib import Path
from typing import Iterator

import numpy as np

from retro_toolkit.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}
SUFFIXES = (".idx", ".bin")


def _with(prefix: Path, suffix: str) -> Path:
    return Path(f"{prefix}{suffix}")  # not with_suffix: prefixes may hold dots ("pile.v2_text_document")


def prefix_of(path: str | Path) -> Path | None:
    """PREFIX for a path naming PREFIX.idx, PREFIX.bin or PREFIX itself; None when no .idx is there."""
    p = Path(path)
    if p.suffix.lower() in SUFFIXES:
        return p.with_suffix("")
    return p if _with(p, ".idx").is_file() else None


class IndexedDataset:
    """The documents of PREFIX.bin/.idx, each a 1-D array of token ids (a view of the memory map)."""

    def __init__(self, prefix: Path, key: str = "data.sources[0]") -> None:
        self.prefix = prefix
        idx, binf = _with(prefix, ".idx"), _with(prefix, ".bin")
        if not idx.is_file() and not binf.is_file():
            raise UserError(f"{key}.path: no Megatron indexed dataset {prefix} ({idx.name} and {binf.name} are both "
                            "missing). Fix the path.")
        for f, other in ((idx, binf), (binf, idx)):
            if not f.is_file():
                raise UserError(f"{key}.path: Megatron indexed dataset {prefix} has {other.name} but no {f.name} "
                                f"(looked for {f}). Copy both files; preprocess_data.py writes them together.")
        raw = np.memmap(idx, dtype=np.uint8, mode="r")
        head = 9 + 8 + 1 + 8 + 8
        if len(raw) < head or bytes(raw[:9]) != MAGIC:
            raise UserError(f"{key}.path: {idx} is not a Megatron indexed dataset index (no MMIDIDX header).")
        version, code, seqs, docs = struct.unpack("<QBQQ", bytes(raw[9:head]))
        if version != 1 or code not in DTYPES or np.dtype(DTYPES[code]).kind == "f":
            raise UserError(f"{key}.path: {idx} has version {version}, token type code {code}; this reader knows "
                            "version 1 with the integer token types megatron-core writes.")
        need = head + seqs * (4 + 8) + docs * 8
        if len(raw) == need + seqs:
            raise UserError(f"{key}.path: {idx} is a multimodal dataset (it stores a mode per sequence): its "
                            "sequences are not all token ids. Give a text dataset.")
        if len(raw) != need or docs < 1:
            raise UserError(f"{key}.path: {idx} is truncated or damaged ({len(raw)} bytes, its header promises "
                            f"{need}).")
        self.dtype = np.dtype(DTYPES[code])
        self.lengths = np.frombuffer(raw, np.int32, seqs, head)
        self.pointers = np.frombuffer(raw, np.int64, seqs, head + 4 * seqs)
        self.doc_bounds = np.frombuffer(raw, np.int64, docs, head + 12 * seqs)
        if self.doc_bounds[0] != 0 or self.doc_bounds[-1] != seqs:
            raise UserError(f"{key}.path: {idx}'s document index does not run from sequence 0 to {seqs}: damaged.")
        size = binf.stat().st_size
        end = int(self.pointers[-1]) + int(self.lengths[-1]) * self.dtype.itemsize if seqs else 0
        if end > size:
            raise UserError(f"{key}.path: {binf} holds {size} bytes but {idx} indexes {end}: the two files are "
                            "not a pair (or .bin is truncated).")
        self.tokens = np.memmap(binf, dtype=self.dtype, mode="r") if size else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return len(self.doc_bounds) - 1

    def document(self, i: int) -> np.ndarray:
        first, last = int(self.doc_bounds[i]), int(self.doc_bounds[i + 1])
        if first == last:
            return self.tokens[:0]
        start = int(self.pointers[first]) // self.dtype.itemsize
        stop = int(self.pointers[last - 1]) // self.dtype.itemsize + int(self.lengths[last - 1])
        return self.tokens[start:stop]

    def documents(self) -> Iterator[tuple[np.ndarray, str]]:
        for i in range(len(self)):
            yield self.document(i), f"{self.prefix}:doc{i}"


FIX = "Set tokenizer.model to the one preprocess_data.py used."


def check_tokenizer(ds: IndexedDataset, tok, key: str, sample: int = 8, span: int = 256, fix: str = FIX) -> None:
    """Refuse a tokenizer that did not write `ds`: ids past its vocabulary, or the first documents'
    text (decoded with it) re-encoding to other ids."""
    ratios = []
    for i in range(min(sample, len(ds))):
        ids = [int(t) for t in ds.document(i)[:span]]
        if ids and max(ids) >= tok.vocab_size:
            raise UserError(f"{key}.path: {ds.prefix} document {i} holds token id {max(ids)}, past the tokenizer's "
                            f"vocabulary ({tok.vocab_size}): it was written with another tokenizer. {fix}")
        ids = [t for t in ids if t not in (tok.eod_id, tok.bos_id)]
        if ids:
            again = tok.encode([tok.decode(ids)])[0]
            ratios.append(difflib.SequenceMatcher(a=ids, b=again, autojunk=False).ratio())
    if ratios and sum(ratios) / len(ratios) < 0.9:
        raise UserError(f"{key}.path: {ds.prefix}'s token ids do not round-trip through the tokenizer (decoded and "
                        f"re-encoded, {100 * sum(ratios) / len(ratios):.0f}% of them come back): it was written with "
                        f"another tokenizer. {fix}")
