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
from retro_toolkit.core.dist import usable_cpus
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
                 special_map: Optional[bytes] = None, json_name: Optional[str] = None) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self.name = name
        self.json_bytes = tokenizer_json
        try:
            self.tk = RustTokenizer.from_str(tokenizer_json.decode("utf-8"))
        except Exception as e:  # tokenizers raises plain Exception on a bad file
            why = (str(e).splitlines() or [type(e).__name__])[0]
            raise UserError(f"cannot load Hugging Face tokenizer {json_name or name + '/' + HF_FILE}: {why}. "
                            "Give a tokenizer.json written by tokenizers or transformers' save_pretrained.") from None
        self.tk.no_padding()
        self.tk.no_truncation()
        # Text that spells a special token ("<|endoftext|>") stays text, as SentencePiece never
        # matches its control symbols: a document cannot end or split where its text says so.
        self.tk.encode_special_tokens = True
        vocab = self.tk.get_vocab(with_added_tokens=True)
        if not vocab:
            raise UserError(f"Hugging Face tokenizer {name}/{HF_FILE} has an empty vocabulary.")
        self.vocab_size = max(vocab.values()) + 1
        # As transformers reads them: tokenizer_config.json, its special tokens overridden by
        # special_tokens_map.json's where both exist.
        source = " + ".join(n for n, data in ((HF_CONFIG, config), (HF_SPECIAL_MAP, special_map)) if data is not None)
        settings = _json(config, f"{name}/{HF_CONFIG}") if config is not None else {}
        if special_map is not None:
            overrides = _json(special_map, f"{name}/{HF_SPECIAL_MAP}")
            settings.update({f"{r}_token": overrides[f"{r}_token"] for r in ROLES if f"{r}_token" in overrides})
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
        # Kept as given where it says everything; else written with the special tokens resolved,
        # so a package (which holds no special_tokens_map.json) reads the same ids.
        self.config = config if config is not None and special_map is None else self._config_from(settings)
        self.eod_id = ids["eos"]
        self.pad_id = ids.get("pad", self.eod_id)
        self.bos_id = ids.get("bos", -1)
        self.unk_id = ids.get("unk", -1)

    @staticmethod
    def _config_from(settings: dict[str, Any]) -> bytes:
        cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **settings}
        return json.dumps(cfg, indent=2).encode()

    @classmethod
    def from_folder(cls, folder: Path, tokenizer_json: Optional[Path] = None) -> "HFTokenizer":
        """A folder as save_pretrained writes it; `tokenizer_json` names the file when given directly."""
        file = tokenizer_json or folder / HF_FILE
        config, special = folder / HF_CONFIG, folder / HF_SPECIAL_MAP
        try:
            return cls(file.read_bytes(), config.read_bytes() if config.is_file() else None, str(folder),
                       special.read_bytes() if special.is_file() else None, str(file))
        except OSError as e:
            raise UserError(f"cannot read Hugging Face tokenizer file {e.filename or file}: {e.strerror}. Fix its "
                            "permissions or the path.") from None

    @classmethod
    def from_bytes(cls, tokenizer_json: bytes, config: Optional[bytes], name: str,
                   special_map: Optional[bytes] = None) -> "HFTokenizer":
        return cls(tokenizer_json, config, name, special_map)

    def encode(self, texts: list[str]) -> list[list[int]]:
        texts = list(texts)
        # Jobs run with TOKENIZERS_PARALLELISM=false (the embedder's tokenizer must not fork
        # threads), so a batch is cut into one slice per core here; encode_batch drops the GIL.
        n = min(usable_cpus(), len(texts) // 8)
        if n < 2:
            return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]
        from concurrent.futures import ThreadPoolExecutor

        step = -(-len(texts) // n)
        with ThreadPoolExecutor(n) as pool:
            parts = pool.map(lambda lo: [e.ids for e in self.tk.encode_batch(texts[lo:lo + step],
                                                                             add_special_tokens=False)],
                             range(0, len(texts), step))
            return [ids for part in parts for ids in part]

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=True)  # as SentencePiece drops control ids

    def files(self) -> dict[str, bytes]:
        return {HF_FILE: self.json_bytes, HF_CONFIG: self.config}

    @property
    def sha256(self) -> str:
        h = hashlib.sha256(self.json_bytes)
        h.update(json.dumps(self.special_ids(), sort_keys=True).encode())
        return h.hexdigest()
