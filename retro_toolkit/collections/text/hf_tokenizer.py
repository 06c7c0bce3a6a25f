"""A Hugging Face tokenizer (tokenizer.json, read by the `tokenizers` library) as the decoder tokenizer.

The special tokens come from tokenizer_config.json (bos_token, eos_token, pad_token,
unk_token), else from special_tokens_map.json; the EOS is required (it ends documents and
answers). Text is encoded without the tokenizer's post-processor (no BOS added), like the
SentencePiece path, and padding or truncation stored in tokenizer.json is switched off.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from retro_toolkit.collections.text.tokenizer import HF_CONFIG, HF_FILE, HF_SPECIAL_MAP, Tokenizer
from retro_toolkit.errors import UserError

ROLES = ("bos", "eos", "pad", "unk")


def _content(value: Any) -> Optional[str]:
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def _json(data: bytes, name: str) -> dict[str, Any]:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{name} is not valid JSON ({e}). Give the tokenizer's files as save_pretrained wrote them.") \
            from None
    if not isinstance(obj, dict):
        raise UserError(f"{name} holds a {type(obj).__name__}, not a JSON object.")
    return obj


class HFTokenizer(Tokenizer):
    kind = "huggingface"

    def __init__(self, tokenizer_json: bytes, config: Optional[bytes], name: str,
                 special_map: Optional[bytes] = None) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self.name = name
        self.json_bytes = tokenizer_json
        try:
            self.tk = RustTokenizer.from_str(tokenizer_json.decode("utf-8"))
        except Exception as e:  # tokenizers raises plain Exception on a bad file
            raise UserError(f"cannot load Hugging Face tokenizer {name}/{HF_FILE}: {str(e).splitlines()[0]}. "
                            "Give a tokenizer.json written by tokenizers or transformers' save_pretrained.") from None
        self.tk.no_padding()
        self.tk.no_truncation()
        vocab = self.tk.get_vocab(with_added_tokens=True)
        if not vocab:
            raise UserError(f"Hugging Face tokenizer {name}/{HF_FILE} has an empty vocabulary.")
        self.vocab_size = max(vocab.values()) + 1
        source = HF_CONFIG if config is not None else HF_SPECIAL_MAP
        settings = _json(config, f"{name}/{HF_CONFIG}") if config is not None else \
            _json(special_map, f"{name}/{HF_SPECIAL_MAP}") if special_map is not None else {}
        ids: dict[str, int] = {}
        for role in ROLES:
            token = _content(settings.get(f"{role}_token"))
            if token is None:
                continue
            if token not in vocab:
                raise UserError(f"{name}/{source}: {role}_token {token!r} is not in {HF_FILE}'s vocabulary: the two "
                                "files belong to different tokenizers. Give the files save_pretrained wrote together.")
            ids[role] = vocab[token]
        if "eos" not in ids:
            raise UserError(f"Hugging Face tokenizer {name} names no eos_token (in {HF_CONFIG} or {HF_SPECIAL_MAP}); "
                            "the decoder needs one to end documents and answers. Add \"eos_token\" to "
                            f"{name}/{HF_CONFIG}.")
        self.config = config if config is not None else self._config_from(settings)
        self.eod_id = ids["eos"]
        self.pad_id = ids.get("pad", self.eod_id)
        self.bos_id = ids.get("bos", -1)
        self.unk_id = ids.get("unk", -1)

    @staticmethod
    def _config_from(settings: dict[str, Any]) -> bytes:
        cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
        cfg.update({f"{r}_token": settings[f"{r}_token"] for r in ROLES if settings.get(f"{r}_token") is not None})
        return json.dumps(cfg, indent=2).encode()

    @classmethod
    def from_folder(cls, folder: Path, tokenizer_json: Optional[Path] = None) -> "HFTokenizer":
        """A folder as save_pretrained writes it; `tokenizer_json` names the file when given directly."""
        file = tokenizer_json or folder / HF_FILE
        config, special = folder / HF_CONFIG, folder / HF_SPECIAL_MAP
        return cls(file.read_bytes(), config.read_bytes() if config.is_file() else None, str(folder),
                   special.read_bytes() if special.is_file() else None)

    @classmethod
    def from_bytes(cls, tokenizer_json: bytes, config: Optional[bytes], name: str,
                   special_map: Optional[bytes] = None) -> "HFTokenizer":
        return cls(tokenizer_json, config, name, special_map)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=True)  # as SentencePiece drops control ids

    def files(self) -> dict[str, bytes]:
        return {HF_FILE: self.json_bytes, HF_CONFIG: self.config}

    @property
    def sha256(self) -> str:
        h = hashlib.sha256(self.json_bytes)
        h.update(json.dumps(self.special_ids(), sort_keys=True).encode())
        return h.hexdigest()
