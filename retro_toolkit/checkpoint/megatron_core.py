"""megatron-core <= 0.15 RetroModel tensors under this toolkit's names.

Both models are built from megatron-core modules, so tensors keep their layouts (fused
q/k/v grouped per head, SwiGLU's two halves stacked in linear_fc1) and only three module
paths differ:
  decoder CCA       cross_attention.attn.*                 -> cross_attention.attention.*
  encoder layer CCA encoder.layers.J.cross_attention.attn.*  -> encoder.layers.J.cross_attention.*
  encoder MLP norm  encoder.layers.J.pre_mlp_layernorm.norm.* -> encoder.layers.J.pre_mlp_layernorm.*
The model that reads them is model.flavor megatron_core: no decoder final norm, and the
encoder cross-attention's residual is the normalised stream.
"""

from __future__ import annotations

import re
from typing import Any

FLAVOR = "megatron_core"

_RULES = (
    (re.compile(r"(\.cross_attention\.encoder\.layers\.\d+\.)cross_attention\.attn\."), r"\1cross_attention."),
    (re.compile(r"(\.cross_attention\.encoder\.layers\.\d+\.)pre_mlp_layernorm\.norm\."), r"\1pre_mlp_layernorm."),
    (re.compile(r"^(decoder\.layers\.\d+\.cross_attention\.)attn\."), r"\1attention."),
)


def rename(name: str) -> str:
    """One megatron-core RetroModel tensor name as this toolkit's model spells it."""
    for pattern, repl in _RULES:
        name = pattern.sub(repl, name)
    return name


def to_toolkit(state: dict[str, Any]) -> dict[str, Any]:
    """A megatron-core RetroModel state dict (TP 1, no _extra_state) under this toolkit's names."""
    return {rename(k): v for k, v in state.items() if not k.endswith("_extra_state")}
