"""Start a model from a .nemo GPT package (`pretrain.init_from: model.nemo`), e.g. one that
`retro-run import-gpt` wrote from a Hugging Face or Megatron-LM GPT.

The package's model section must describe this model's decoder (Retro-only keys may differ)
and its tokenizer must be the work directory's; a Retro model then gets the decoder and
keeps its chunked cross-attention and encoder as initialised, a GPT twin gets everything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retro_toolkit.collections.retro.checkpointing import EVAL_FREE_KEYS, RETRIEVAL_KEYS, check_model_section
from retro_toolkit.collections.retro.checkpointing import is_retrieval_param
from retro_toolkit.errors import UserError


def is_package(path: str | Path) -> bool:
    return Path(path).is_file() and str(path).endswith(".nemo")


def init_from_package(path: Path, model, section: dict[str, Any], workdir: Path) -> tuple[list[str], list[str]]:
    """Load a GPT package's weights into `model` (built from `section`); returns (new, loaded) names."""
    from retro_toolkit.checkpoint.nemo import restore
    from retro_toolkit.collections.text.tokenizer_stage import MODEL_FILE
    from retro_toolkit.core import files

    pkg = restore(path, device=str(next(model.parameters()).device))
    if pkg.section.get("arch") != "gpt":
        raise UserError(f"pretrain.init_from: {path} is a {pkg.section.get('arch')!r} package; init_from starts from "
                        "a GPT. To continue a Retro model, resume its training checkpoint.")
    check_model_section(path, pkg.section, section, free=EVAL_FREE_KEYS | RETRIEVAL_KEYS)
    saved, current = (pkg.config.get("tokenizer") or {}).get("sha256"), files.sha256_file(workdir / MODEL_FILE)
    if saved != current:
        raise UserError(f"pretrain.init_from: {path} was made with another tokenizer (sha256 {str(saved)[:12]}, this "
                        f"work directory's {current[:12]}): set tokenizer.model to the package's tokenizer.model.")
    state = {k: v for k, v in pkg.model.state_dict().items() if not k.endswith("_extra_state")}
    del pkg
    result = model.load_state_dict(state, strict=False)
    new = sorted(k for k in result.missing_keys if not k.endswith("_extra_state"))
    if [n for n in new if not is_retrieval_param(n)] or result.unexpected_keys:
        raise UserError(f"pretrain.init_from: {path} does not match this model's decoder (missing "
                        f"{[n for n in new if not is_retrieval_param(n)][:10]}, unexpected "
                        f"{result.unexpected_keys[:10]}). Use the package of this model's GPT twin.")
    return new, sorted(state)
