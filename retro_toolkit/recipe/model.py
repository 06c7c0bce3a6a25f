"""The recipe's `model:` section: the only place model settings and their defaults are written.

`RetroSettings` are the keys megatron-core's TransformerConfig lacks; RetroConfig (the
model's config, collections/retro/config.py) inherits them, so they arrive there by name.
`DecoderSettings` are the keys TransformerConfig has under the same names, and the few GPTModel
takes as arguments (vocabulary, sequence length, embedding tying); `ModelConfig` is both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from retro_toolkit.errors import UserError
from retro_toolkit.recipe.fields import VOCAB, WHY_CLUSTER, WHY_SHAPE, WHY_VOCAB, bounded

Arch = Literal["retro", "gpt"]
Flavor = Literal["megatron_legacy", "megatron_core"]
PositionType = Literal["rope", "learned_absolute"]

# Keys added after work directories and checkpoints existed, with the value that reproduces the
# old behaviour: at that value they stay out of fingerprints and resume checks, so those match.
ADDED_KEYS: tuple[tuple[str, object], ...] = (("cca_zero_init", False), ("flavor", "megatron_legacy"),
                                              ("num_query_groups", None), ("add_qkv_bias", False),
                                              ("squared_relu", False), ("rope_scaling_factor", None))


def added_keys() -> tuple[tuple[str, object], ...]:
    """ADDED_KEYS as recipe keys, for the stages whose fingerprint holds the model section."""
    return tuple((f"model.{k}", v) for k, v in ADDED_KEYS)


@dataclass
class RetroSettings:
    # Retro: chunk length m, neighbours per chunk k, chunks retrieved per neighbour
    # (r = num_retrieved_chunks * chunk_length tokens: the chunk plus its continuation).
    chunk_length: int = bounded(64, 1, 2**16, WHY_SHAPE)
    num_neighbors: int = bounded(2, 1, 1024, WHY_SHAPE)
    num_retrieved_chunks: int = bounded(2, 1, 1024, WHY_SHAPE)
    encoder_num_layers: int = bounded(2, 1, 1024, WHY_SHAPE)
    # 1-based decoder layers with chunked cross-attention; null = the Retro rule (6, 9, 12, ...
    # up to 15 layers, else 9, 12, ...). Models under 6 layers need an explicit list.
    # An empty list is the GPT twin.
    cca_layers: Optional[list[int]] = None
    # Dropout in the neighbour encoder.
    encoder_hidden_dropout: float = 0.1
    encoder_attention_dropout: float = 0.1
    # Scales the chunked cross-attention output; 0 turns retrieval off (decoder only).
    retrieval_gate: float = 1.0
    # Rotary positions inside chunked cross-attention (RETRO's relative positions: query row j
    # of a chunk sits at m-1+j, neighbour token t at t, so copying from a neighbour is a fixed
    # offset, easy to learn). Off = Megatron-LM/InstructRetro's CCA.
    cca_rotary: bool = False
    # A final norm on the neighbour encoder's output. Off = Megatron-LM's retriever (and
    # InstructRetro's checkpoints); on, copying from neighbours is learned far faster
    # (tests/test_retro_model.py's copy task).
    encoder_final_norm: bool = False
    # Rotary positions (the decoder's settings, 0..r-1 within each neighbour) in the encoder's
    # self-attention. Off = both upstreams: their encoder sees no positions under RoPE.
    encoder_rotary: bool = False
    # Which upstream's layer math where the two differ: "megatron_legacy" (Megatron-LM's
    # InstructRetro model: a final norm after the decoder; the encoder's cross-attention adds
    # to the un-normalised neighbour stream) or "megatron_core" (megatron-core <= 0.15's
    # RetroModel: no decoder final norm; that residual is the normalised stream).
    flavor: Flavor = "megatron_legacy"
    # Start chunked cross-attention's output projection at zero, so a fresh Retro (or one
    # started from a GPT checkpoint) computes exactly its GPT twin until retrieval pays off.
    cca_zero_init: bool = False
    # "rope" or "learned_absolute"; rotary_percent of each head's channels get RoPE.
    position_embedding_type: PositionType = "rope"
    rotary_percent: float = 1.0
    rotary_base: int = bounded(10000, 1, 10**9, WHY_SHAPE)
    # Llama 3.1's RoPE scaling with this factor (low/high frequency factors 1 and 4, original
    # context 8192, as megatron-core implements it); null = none.
    rope_scaling_factor: Optional[float] = None


@dataclass
class DecoderSettings:
    # "retro" (decoder with chunked cross-attention + neighbour encoder) or "gpt" (its twin).
    arch: Arch = "retro"
    # The decoder; TransformerConfig fields of the same names.
    num_layers: int = bounded(2, 1, 1024, WHY_SHAPE)
    hidden_size: int = bounded(64, 1, 2**17, WHY_SHAPE)
    num_attention_heads: int = bounded(4, 1, 2**14, WHY_SHAPE)
    ffn_hidden_size: int = bounded(128, 1, 2**19, WHY_SHAPE)
    # Key/value heads (grouped-query attention: each serves num_attention_heads / this query
    # heads); null = one per query head. Chunked cross-attention stays multi-head.
    num_query_groups: Optional[int] = bounded(None, 1, 2**14, WHY_SHAPE)
    # Tokens per sample.
    seq_length: int = bounded(256, 1, 2**20, WHY_SHAPE)
    # Vocabulary size; null = the tokenizer's.
    vocab_size: Optional[int] = bounded(None, 16, VOCAB, WHY_VOCAB)
    # Dropout in the decoder (hidden states, attention probabilities).
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    # "LayerNorm" or "RMSNorm"; apply_layernorm_1p stores gamma - 1 (zero-centred gamma).
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    apply_layernorm_1p: bool = False
    layernorm_epsilon: float = 1e-5
    # SwiGLU MLP (gated SiLU) instead of GELU; squared_relu: ReLU(x)^2, ungated (Nemotron).
    swiglu: bool = False
    squared_relu: bool = False
    # Biases in the linear layers; add_qkv_bias: on the query/key/value projection even
    # without them (Qwen2).
    add_bias_linear: bool = True
    add_qkv_bias: bool = False
    # Standard deviation of the normal weight initialisation.
    init_method_std: float = 0.02
    # Tensor-parallel ranks per model copy (must divide the number of processes).
    tensor_model_parallel_size: int = bounded(1, 1, 1024, WHY_CLUSTER)
    # Separate input embedding and output projection matrices.
    untie_embeddings_and_output_weights: bool = False


@dataclass
class ModelConfig(RetroSettings, DecoderSettings):
    """The recipe's `model:` section: the decoder's keys first, then Retro's."""


def default_cca_layers(num_layers: int) -> list[int]:
    """Retro's rule: chunked cross-attention in layers 6, 9, 12, ... (9, 12, ... above 15 layers)."""
    start = 6 if num_layers <= 15 else 9
    return list(range(start, num_layers + 1, 3))


def check(m: dict[str, Any]) -> None:
    """Shape checks a job would otherwise hit only after it queued for hours."""
    if m["seq_length"] % m["chunk_length"]:
        raise UserError(
            f"model.seq_length ({m['seq_length']}) must be a multiple of model.chunk_length "
            f"({m['chunk_length']}): Retro splits every sample into whole chunks."
        )
    if m["swiglu"] and m["squared_relu"]:
        raise UserError("model.swiglu and model.squared_relu are both true: an MLP has one activation; "
                        "set one of them false.")
    if m["rope_scaling_factor"] is not None and not m["rope_scaling_factor"] >= 1.0:
        raise UserError(f"model.rope_scaling_factor ({m['rope_scaling_factor']}) must be at least 1, or null for "
                        "no RoPE scaling.")
    if m["encoder_rotary"] and m["position_embedding_type"] != "rope":
        raise UserError("model.encoder_rotary needs model.position_embedding_type rope (it is "
                        f"'{m['position_embedding_type']}'); set model.encoder_rotary false.")
    r = m["num_retrieved_chunks"] * m["chunk_length"]
    if m["position_embedding_type"] == "learned_absolute" and m["arch"] == "retro" and r > m["seq_length"]:
        raise UserError(
            f"model.position_embedding_type learned_absolute numbers each neighbour's tokens 0..r-1 in the "
            f"decoder's table of model.seq_length ({m['seq_length']}) positions, so r = num_retrieved_chunks * "
            f"chunk_length ({r}) must not exceed it. Lower model.num_retrieved_chunks or raise model.seq_length.")
    n = m["num_layers"]
    if m["arch"] == "retro":
        cca = m["cca_layers"] if m["cca_layers"] is not None else default_cca_layers(n)
        if not cca:
            raise UserError(
                f"model.num_layers is {n}: Retro's rule puts chunked cross-attention in layers 6, 9, ... so a "
                "model this shallow has none. Set model.cca_layers to an explicit list, e.g. [2].")
        outside = [x for x in cca if not 1 <= x <= n]
        if outside:
            raise UserError(f"model.cca_layers {cca} names layers outside 1..{n} (model.num_layers; 1-based).")
        if len(set(cca)) != len(cca):
            raise UserError(f"model.cca_layers {cca} names a layer twice; list each layer once.")
    if m["hidden_size"] % m["num_attention_heads"]:
        raise UserError(f"model.hidden_size ({m['hidden_size']}) must be a multiple of model.num_attention_heads "
                        f"({m['num_attention_heads']}).")
    groups = m["num_query_groups"]
    if groups is not None and m["num_attention_heads"] % groups:
        raise UserError(f"model.num_attention_heads ({m['num_attention_heads']}) must be a multiple of "
                        f"model.num_query_groups ({groups}): each key/value head serves as many query heads.")
    tp = m["tensor_model_parallel_size"]
    for key in ("num_attention_heads", "ffn_hidden_size", *(("num_query_groups",) if groups else ())):
        if m[key] % tp:
            raise UserError(f"model.{key} ({m[key]}) must be a multiple of model.tensor_model_parallel_size ({tp}): "
                            "tensor parallelism splits it evenly over the ranks.")
