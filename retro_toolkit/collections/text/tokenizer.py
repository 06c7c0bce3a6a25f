"""The decoder tokenizer: a SentencePiece model or a Hugging Face tokenizer (tokenizer.json).

Both kinds answer the same questions: encode text without special tokens, decode ids, the
vocabulary size (highest id + 1) and the special ids. eod (the end-of-document token between
documents of a token stream, and the end of an answer) is the tokenizer's EOS; pad falls
back to it where the tokenizer has none.

    tok = open_tokenizer("tokenizer.model")          # a SentencePiece .model
    tok = open_tokenizer("Llama-3.2-1B/")            # a folder with tokenizer.json (+ tokenizer_config.json)
    tok = workdir_tokenizer(workdir)                 # what the `tokenizer` stage put in a work directory
"""

from __future__ import annotations

import os
from pathlib import Path

from retro_toolkit.errors import UserError

# The work directory's tokenizer folder: tokenizer.model, or tokenizer.json + tokenizer_config.json.
TOKENIZER_DIR = "tokenizer"
SP_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
HF_CONFIG = "tokenizer_config.json"
HF_SPECIAL_MAP = "special_tokens_map.json"


class Tokenizer:
    """What every stage asks of a tokenizer (subclasses: SentencePieceTokenizer, HFTokenizer)."""

    kind: str  # "sentencepiece" or "huggingface"
    name: str  # where it came from, for messages
    vocab_size: int
    eod_id: int
    pad_id: int
    bos_id: int  # -1 where the tokenizer has none
    unk_id: int

    def encode(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def files(self) -> dict[str, bytes]:
        """The files that hold this tokenizer (packages and work directories carry these)."""
        raise NotImplementedError

    @property
    def sha256(self) -> str:
        """Identity: equal only when the same text gives the same ids (and the same special ids)."""
        raise NotImplementedError

    def special_ids(self) -> dict[str, int]:
        return {"pad": self.pad_id, "eod": self.eod_id, "bos": self.bos_id, "unk": self.unk_id}


def open_tokenizer(path: str | os.PathLike, key: str = "tokenizer.model") -> Tokenizer:
    """A SentencePiece .model file, a tokenizer.json file, or a folder holding either (tokenizer.json
    wins where a folder has both, as in transformers). `key` names the setting in messages."""
    from retro_toolkit.collections.text.hf_tokenizer import HFTokenizer
    from retro_toolkit.collections.text.sentencepiece_tokenizer import SentencePieceTokenizer

    p = Path(path)
    if p.is_dir():
        if (p / HF_FILE).is_file():
            return HFTokenizer.from_folder(p)
        if (p / SP_FILE).is_file():
            return SentencePieceTokenizer(p / SP_FILE)
        raise UserError(f"{key}: folder {p} holds neither {HF_FILE} (a Hugging Face tokenizer) nor {SP_FILE} "
                        "(SentencePiece). Point it at the tokenizer's file or at the folder that holds it.")
    if not p.is_file():
        raise UserError(f"{key}: {p} does not exist. Give a SentencePiece .model, a tokenizer.json, or the folder "
                        "holding one.")
    if p.name.endswith(".json"):
        return HFTokenizer.from_folder(p.parent, p)
    return SentencePieceTokenizer(p)


def tokenizer_from_files(files: dict[str, bytes], name: str) -> Tokenizer:
    """The tokenizer held by these files (a package's members): tokenizer.json or tokenizer.model."""
    from retro_toolkit.collections.text.hf_tokenizer import HFTokenizer
    from retro_toolkit.collections.text.sentencepiece_tokenizer import SentencePieceTokenizer

    if HF_FILE in files:
        return HFTokenizer.from_bytes(files[HF_FILE], files.get(HF_CONFIG), name, files.get(HF_SPECIAL_MAP))
    if SP_FILE in files:
        return SentencePieceTokenizer.from_bytes(files[SP_FILE], name)
    raise UserError(f"{name} holds no tokenizer ({HF_FILE} or {SP_FILE}).")


def workdir_tokenizer(workdir: str | os.PathLike) -> Tokenizer:
    """The tokenizer the `tokenizer` stage wrote into a work directory."""
    folder = Path(workdir) / TOKENIZER_DIR
    if not ((folder / HF_FILE).is_file() or (folder / SP_FILE).is_file()):
        raise UserError(f"{folder} holds no tokenizer: run the tokenizer stage first (--stages tokenizer).")
    return open_tokenizer(folder, str(folder))


def write_tokenizer(tok: Tokenizer, folder: Path) -> list[str]:
    """Put `tok`'s files into `folder` (each atomically), removing the other kind's; returns the names."""
    from retro_toolkit.core import files as f

    folder.mkdir(parents=True, exist_ok=True)
    names = tok.files()
    for stale in (SP_FILE, HF_FILE, HF_CONFIG, HF_SPECIAL_MAP):
        if stale not in names:
            (folder / stale).unlink(missing_ok=True)
    for name, data in names.items():
        with f.atomic_path(folder / name) as tmp:
            tmp.write_bytes(data)
    return sorted(names)
