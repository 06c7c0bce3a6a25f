"""Retro layers as megatron-core ModuleSpecs (local, non-Transformer-Engine modules).

Decoder: megatron-core's GPT layer everywhere; a CCA layer fills the layer's three
cross-attention slots (pre_cross_attn_layernorm, cross_attention, cross_attn_bda). The
first CCA layer's cross-attention also owns the neighbour encoder: a TransformerBlock
whose layers self-attend bidirectionally over one neighbour and whose first layer
cross-attends to the decoder chunk that retrieved it.
"""

from __future__ import annotations

import dataclasses

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import CrossAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from retro_toolkit.collections.retro.cached_decoding import NeighbourCrossAttention
from retro_toolkit.collections.retro.chunked_cross_attention import (
    ChunkedCrossAttention,
    ChunkedCrossAttentionBDA,
    ChunkedCrossAttentionSubmodules,
)
from retro_toolkit.collections.retro.config import RetroConfig
from retro_toolkit.collections.retro.encoder_attention import EncoderCrossAttention, EncoderCrossAttentionBDA
from retro_toolkit.core.cpu.modules import Norm, SDPAttention
from retro_toolkit.core.cpu.rope import RetroSelfAttention


def core_attention(config: RetroConfig) -> type:
    """The core-attention module config.core_attention names ("unfused": megatron-core's own)."""
    return SDPAttention if config.core_attention == "sdpa" else DotProductAttention


def gpt_layer_spec(config: RetroConfig) -> ModuleSpec:
    """megatron-core's local GPT layer with our norm (LayerNorm-1p capable, no apex).

    With config.core_attention "sdpa" (default) the self-attention is RetroSelfAttention
    (megatron-core's, with a cheaper rotary embedding) over SDPAttention; "unfused" keeps
    megatron-core's SelfAttention + DotProductAttention exactly.
    """
    spec = get_gpt_layer_local_spec()
    self_attn = spec.submodules.self_attention
    if config.core_attention == "sdpa":
        self_attn = dataclasses.replace(
            self_attn,
            module=RetroSelfAttention,
            submodules=dataclasses.replace(self_attn.submodules, core_attention=SDPAttention),
        )
    return dataclasses.replace(
        spec,
        submodules=dataclasses.replace(
            spec.submodules, input_layernorm=Norm, pre_mlp_layernorm=Norm, self_attention=self_attn
        ),
    )


def _cross_attention_spec(config: RetroConfig, module: type) -> ModuleSpec:
    return ModuleSpec(
        module=module,
        params={"attn_mask_type": AttnMaskType.padding},
        submodules=CrossAttentionSubmodules(
            linear_q=ColumnParallelLinear,
            linear_kv=ColumnParallelLinear,
            core_attention=core_attention(config),
            linear_proj=RowParallelLinear,
        ),
    )


def encoder_block_spec(config: RetroConfig) -> TransformerBlockSubmodules:
    """Neighbour encoder: bidirectional (padding-masked) GPT layers; layer 1 adds cross-attention.
    A final norm only with config.encoder_final_norm (Megatron-LM's retriever has none)."""
    gpt = gpt_layer_spec(config)
    self_attn = dataclasses.replace(gpt.submodules.self_attention, params={"attn_mask_type": AttnMaskType.padding})
    plain = dataclasses.replace(gpt, submodules=dataclasses.replace(gpt.submodules, self_attention=self_attn))
    first = dataclasses.replace(
        plain,
        submodules=dataclasses.replace(
            plain.submodules,
            pre_cross_attn_layernorm=Norm,
            cross_attention=_cross_attention_spec(config, EncoderCrossAttention),
            cross_attn_bda=EncoderCrossAttentionBDA,
        ),
    )
    layers = [first] + [plain] * (config.encoder_num_layers - 1)
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=Norm if config.encoder_final_norm else None)


def cca_layer_spec(config: RetroConfig, with_encoder: bool) -> ModuleSpec:
    gpt = gpt_layer_spec(config)
    cca = ModuleSpec(
        module=ChunkedCrossAttention,
        submodules=ChunkedCrossAttentionSubmodules(
            attention=_cross_attention_spec(config, NeighbourCrossAttention),
            encoder=encoder_block_spec(config) if with_encoder else None,
        ),
    )
    return dataclasses.replace(
        gpt,
        submodules=dataclasses.replace(
            gpt.submodules,
            pre_cross_attn_layernorm=Norm,
            cross_attention=cca,
            cross_attn_bda=ChunkedCrossAttentionBDA,
        ),
    )


def decoder_block_spec(config: RetroConfig) -> TransformerBlockSubmodules:
    """One spec per decoder layer: CCA layers at config.cca_layers, GPT layers elsewhere; a final
    norm in the megatron_legacy flavor only (megatron-core's Retro decoder block has none)."""
    gpt = gpt_layer_spec(config)
    cca = set(config.cca_layers)
    first = min(cca) if cca else None
    layers = [
        cca_layer_spec(config, with_encoder=(i == first)) if i in cca else gpt for i in range(1, config.num_layers + 1)
    ]
    final_norm = Norm if config.flavor == "megatron_legacy" else None
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=final_norm)
