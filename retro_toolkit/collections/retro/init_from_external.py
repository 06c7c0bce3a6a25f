"""Start a model from a GPT that was not trained by this toolkit (`pretrain.init_from`):

  FILE.nemo                               a package of this toolkit, or a NeMo 1.x megatron_gpt package
  a folder with config.json               a Hugging Face Llama, Mistral, Qwen2 or Nemotron (save_pretrained)
  a folder with latest_checkpointed_iteration.txt
                                          a Megatron-LM GPT checkpoint, legacy or torch_dist, any TP size
(checkpoint/gpt_sources.py reads each.)
The checkpoint's own model section must describe this model's decoder (Retro-only keys may
differ; the refusal names every differing key) and its tokenizer must be the work
directory's where it carries one (packages, and Hugging Face folders with tokenizer.json or
tokenizer.model).
A Retro model gets the decoder and keeps chunked cross-attention and its encoder as
initialised; a GPT (the twin, or model.arch gpt) gets everything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from retro_toolkit.checkpoint.gpt_sources import read
from retro_toolkit.collections.retro.checkpointing import (
    EVAL_FREE_KEYS,
    RETRIEVAL_KEYS,
    check_model_section,
    check_tokenizer,
    is_retrieval_param,
)
from retro_toolkit.collections.text.tokenizer import workdir_tokenizer
from retro_toolkit.errors import UserError

KEY = "pretrain.init_from"


def init_from_external(path: Path, kind: str, model, section: dict[str, Any], workdir: Path,
                       log: Callable[[str], None]) -> tuple[list[str], list[str]]:
    """Load the GPT at `path` into `model` (built from `section`); returns (new, loaded) names."""
    from retro_toolkit.collections.retro.full_state_dict import load_full_state_dict

    source = read(path, kind)
    saved, full = source.section, source.tensors
    tokenizer_sha = source.tokenizer.sha256 if source.tokenizer is not None else None
    if saved.get("arch") != "gpt":
        raise UserError(f"{KEY}: {path} holds a {saved.get('arch')!r} model; init_from starts from a GPT. To "
                        "continue a Retro model, resume its training checkpoint.")
    check_model_section(path, saved, section, free=EVAL_FREE_KEYS | RETRIEVAL_KEYS)
    if tokenizer_sha is None:
        log(f"init_from {path}: the checkpoint carries no tokenizer; make sure tokenizer.model is the one it was "
            "trained with")
    if tokenizer_sha is not None and workdir_tokenizer(workdir).sha256 in source.also_sha256:
        tokenizer_sha = None  # the work directory took the folder's tokenizer.model: the same tokenizer
    check_tokenizer(path, {"tokenizer_sha256": tokenizer_sha}, workdir)
    own = [k for k in model.state_dict() if not k.endswith("_extra_state")]
    extra = sorted(set(full) - set(own))
    missing = sorted(k for k in own if k not in full)
    if extra or [k for k in missing if not is_retrieval_param(k)]:
        raise UserError(f"{KEY}: {path} does not match this model's decoder (missing "
                        f"{[k for k in missing if not is_retrieval_param(k)][:8]}, unexpected {extra[:8]}).")
    load_full_state_dict(model, full, missing_ok=is_retrieval_param)
    return missing, sorted(full)
