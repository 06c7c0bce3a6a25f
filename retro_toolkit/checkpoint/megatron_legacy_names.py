"""Legacy Megatron-LM tensor names (ParallelTransformer) as this toolkit's megatron-core names.

A Retro decoder layer that cross-attends holds `inter_attention.*` tensors, and so does
each layer of the retriever (encoder) inside it; which norm feeds what depends on whether
the layer cross-attends. Checkpoint versions before 3.0 spelled the norms *_layernorm.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from retro_toolkit.errors import UserError

# One transformer layer, legacy name -> ours. `{x}` is where a Retro cross-attention sits:
# "cross_attention.attention." in a decoder layer, "cross_attention." in the encoder's.
LAYER_NAMES = {
    "input_norm": "input_layernorm",
    "self_attention.query_key_value": "self_attention.linear_qkv",
    "self_attention.dense": "self_attention.linear_proj",
    "inter_attention.query": "{x}linear_q",
    "inter_attention.key_value": "{x}linear_kv",
    "inter_attention.dense": "{x}linear_proj",
    "mlp.dense_h_to_4h": "mlp.linear_fc1",
    "mlp.dense_4h_to_h": "mlp.linear_fc2",
}


def normalise_name(name: str) -> str:
    """Checkpoint versions before 3.0 spelled norms *_layernorm."""
    return re.sub(r"(input|post_attention|post_inter_attention|final)_layernorm\b", r"\1_norm", name)


def _layer(rest: str, ours_prefix: str, cross: str) -> str | None:
    for legacy, ours in LAYER_NAMES.items():
        if rest.startswith(legacy + "."):
            return ours_prefix + ours.format(x=cross) + rest[len(legacy):]
    return None


def rename(full: dict[str, Any], section: dict[str, Any], where: Path) -> tuple[dict[str, Any], list[str]]:
    """(our name -> tensor, legacy names that map to nothing)."""
    from retro_toolkit.collections.retro.config import default_cca_layers

    names = {normalise_name(raw): raw for raw in full}
    # A layer (decoder or encoder) cross-attends iff it holds inter_attention tensors.
    crossing = {n.split(".inter_attention.", 1)[0] + "." for n in names if ".inter_attention." in n}
    found = sorted(int(m.group(1)) + 1 for p in crossing
                   if (m := re.fullmatch(r"language_model\.encoder\.layers\.(\d+)\.", p)))
    rule = section["cca_layers"] or (default_cca_layers(section["num_layers"]) if section["arch"] == "retro" else [])
    if found != rule:
        raise UserError(f"{where}: chunked cross-attention sits in layers {found} (1-based) but Retro's rule for "
                        f"{section['num_layers']} layers puts it in {rule}; this importer expects the rule.")
    out: dict[str, Any] = {}
    unknown: list[str] = []
    for name, raw in names.items():
        ours = None
        if name == "language_model.embedding.word_embeddings.weight":
            ours = "embedding.word_embeddings.weight"
        elif name == "language_model.embedding.position_embeddings.weight":
            ours = "embedding.position_embeddings.weight"
        elif name == "language_model.output_layer.weight":
            ours = "output_layer.weight"
        elif name.startswith("language_model.encoder.final_norm."):
            ours = "decoder.final_layernorm." + name.rsplit(".", 1)[1]
        else:
            m = re.fullmatch(r"language_model\.encoder\.layers\.(\d+)\.(retriever\.(?:layers\.(\d+)\.)?)?(.+)", name)
            if m:
                ours = _layer_name(m, crossing)
        if ours is None:
            unknown.append(raw)
        else:
            out[ours] = full[raw]
    return out, unknown


def _layer_name(m: re.Match, crossing: set[str]) -> str | None:
    i, retriever, j, rest = m.group(1), m.group(2), m.group(3), m.group(4)
    decoder = f"decoder.layers.{i}."
    if retriever is None:
        return _in_layer(rest, decoder, f"language_model.encoder.layers.{i}." in crossing, "cross_attention.attention.")
    encoder = decoder + "cross_attention.encoder."
    if j is None:
        return encoder + "final_layernorm." + rest[len("final_norm."):] if rest.startswith("final_norm.") else None
    legacy_prefix = f"language_model.encoder.layers.{i}.retriever.layers.{j}."
    return _in_layer(rest, f"{encoder}layers.{j}.", legacy_prefix in crossing, "cross_attention.")


def _in_layer(rest: str, prefix: str, has_cross: bool, cross: str) -> str | None:
    # With cross-attention, the norm after self-attention feeds it and the norm after it
    # feeds the MLP; without, the norm after self-attention feeds the MLP.
    if rest.startswith("post_attention_norm."):
        target = "pre_cross_attn_layernorm." if has_cross else "pre_mlp_layernorm."
        return prefix + target + rest[len("post_attention_norm."):]
    if rest.startswith("post_inter_attention_norm."):
        return prefix + "pre_mlp_layernorm." + rest[len("post_inter_attention_norm."):]
    return _layer(rest, prefix, cross)
