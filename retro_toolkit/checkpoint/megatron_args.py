"""A model section of this toolkit's recipe from a Megatron-LM run's training arguments.

The checkpoint's `args` give the model's shape; legacy runs kept Retro's chunk length
outside them, in the Retro workdir's args.json, which `read_retro_args` reads to complete
them. Settings this toolkit's model cannot compute the same way are refused here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from retro_toolkit.core import files
from retro_toolkit.errors import UserError

CHUNK_KEYS = ("retro_chunk_length", "retro_gpt_chunk_length")


def chunk_length(args: dict[str, Any]) -> int | None:
    """The Retro chunk length args record (megatron-core runs do; legacy training args do not:
    legacy Megatron-LM read it from <retro_workdir>/args.json)."""
    return next((int(args[k]) for k in CHUNK_KEYS if args.get(k)), None)


def read_retro_args(path: str | os.PathLike) -> dict[str, Any]:
    """A Retro workdir's args.json (what legacy Megatron-LM's validate_args read its Retro settings from)."""
    p = Path(path)
    data = files.read_user_json(p, f"--retro-args {p}", "give the Retro workdir's args.json.")
    if not isinstance(data, dict) or chunk_length(data) is None:
        raise UserError(f"--retro-args {p} records no chunk length ({' or '.join(CHUNK_KEYS)}); it is not a "
                        "Retro workdir's args.json.")
    return data


def section_from_args(args: dict[str, Any], where: Path) -> dict[str, Any]:
    """Our model section from Megatron-LM's training arguments."""
    def need(key: str) -> Any:
        if args.get(key) is None:
            raise UserError(f"{where}: the checkpoint's args lack '{key}'; cannot tell the model's shape.")
        return args[key]

    heads = int(need("num_attention_heads"))
    if int(args.get("num_experts") or 0) > 1:
        raise UserError(f"{where}: mixture-of-experts checkpoints are not supported.")
    if args.get("apply_residual_connection_post_layernorm"):
        raise UserError(f"{where}: the checkpoint was trained with apply_residual_connection_post_layernorm, "
                        "whose residuals are the normalised states in every layer; this toolkit's layers "
                        "add to the un-normalised stream (Megatron-LM's default), so it cannot be imported.")
    factor = args.get("rotary_seq_len_interpolation_factor")
    if factor not in (None, 1, 1.0):
        raise UserError(f"{where}: the checkpoint was trained with rotary_seq_len_interpolation_factor {factor} "
                        "(position interpolation), which this toolkit's rotary embedding does not apply; "
                        "it cannot be imported without changing what it computes.")
    retro = bool(args.get("retro_add_retriever"))
    chunk = chunk_length(args) or 64
    section = {
        "arch": "retro" if retro else "gpt",
        "num_layers": int(need("num_layers")),
        "hidden_size": int(need("hidden_size")),
        "num_attention_heads": heads,
        "num_query_groups": int(args.get("num_query_groups") or heads) if args.get("group_query_attention") else heads,
        "ffn_hidden_size": int(args.get("ffn_hidden_size") or 4 * int(need("hidden_size"))),
        "seq_length": int(need("seq_length")),
        "vocab_size": int(need("padded_vocab_size")),
        "chunk_length": int(chunk),
        "num_neighbors": int(args.get("retro_num_neighbors") or 2),
        "num_retrieved_chunks": int(args.get("retro_num_retrieved_chunks") or 2),
        "encoder_num_layers": int(args.get("retro_encoder_layers") or 2),
        "cca_layers": None,
        "normalization": str(args.get("normalization") or "LayerNorm"),
        "apply_layernorm_1p": bool(args.get("apply_layernorm_1p", False)),
        "layernorm_epsilon": float(args.get("norm_epsilon") or args.get("layernorm_epsilon") or 1e-5),
        "swiglu": bool(args.get("swiglu", False)),
        "squared_relu": bool(args.get("squared_relu", False)),
        "add_bias_linear": bool(args.get("add_bias_linear", True)),
        "add_qkv_bias": bool(args.get("add_qkv_bias", False)),
        "rope_scaling_factor": float(args.get("rope_scaling_factor") or 8.0) if args.get("use_rope_scaling") else None,
        "position_embedding_type": str(args.get("position_embedding_type") or "learned_absolute"),
        "rotary_percent": float(args.get("rotary_percent") or 1.0),
        "rotary_base": int(args.get("rotary_base") or 10000),
        "untie_embeddings_and_output_weights": bool(args.get("untie_embeddings_and_output_weights", False)),
        # Legacy's --retro-attention-gate scales the CCA output as retrieval_gate does.
        "retrieval_gate": float(1.0 if args.get("retro_attention_gate") is None else args["retro_attention_gate"]),
        "cca_rotary": False,
        # The legacy model: a final norm after the decoder, no positions inside the encoder.
        "flavor": "megatron_legacy",
        "encoder_rotary": False,
    }
    if section["seq_length"] % section["chunk_length"]:
        hint = "" if chunk_length(args) else (" (64: the args do not record the chunk length; pass the Retro "
                                              "workdir's args.json as --retro-args)")
        raise UserError(f"{where}: seq_length {section['seq_length']} is not a multiple of the Retro chunk length "
                        f"{section['chunk_length']}{hint}.")
    return section
