"""The neighbour encoder's cross-attention: each neighbour attends to the chunk that retrieved it.

The first layer of the encoder (specs.encoder_block_spec) fills its cross-attention slots
with these: neighbours [r, b*l*k, h] are the queries, the decoder chunk [m, b*l, h] the
keys and values, shared by the chunk's k neighbours.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.nn.functional as F
from megatron.core.transformer.attention import CrossAttention
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from retro_toolkit.collections.retro.config import RetroConfig


class EncoderCrossAttention(CrossAttention):
    """Each neighbour attends to the decoder chunk that retrieved it.

    Queries are the k neighbours of a chunk ([r, b*l*k, h]); keys/values are projected once
    per chunk ([m, b*l, h]) and shared by its k neighbours instead of being recomputed.
    Returns (output, bias, its normalised input) for EncoderCrossAttentionBDA.
    """

    def __init__(self, config: RetroConfig, *args: Any, **kwargs: Any):
        super().__init__(config.multi_head(), *args, **kwargs)

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any):
        out, bias = super().forward(hidden_states, *args, **kwargs)
        return out, bias, hidden_states

    def get_query_key_value_tensors(self, hidden_states, key_value_states, output_gate=False, split_qkv=True):
        query, key, value = super().get_query_key_value_tensors(
            hidden_states, key_value_states, output_gate=output_gate, split_qkv=split_qkv
        )
        repeat = query.size(1) // key.size(1)
        if repeat > 1:
            key = key.repeat_interleave(repeat, dim=1)
            value = value.repeat_interleave(repeat, dim=1)
        return query, key, value


class EncoderCrossAttentionBDA(MegatronModule):
    """Bias-dropout-add after the encoder's cross-attention, with the residual of config.flavor.

    megatron_legacy adds to the un-normalised neighbour states (the layer's residual, as
    Megatron-LM's apply_residual_connection_post_layernorm=False); megatron_core adds to the
    normalised ones that entered the cross-attention.
    """

    def __init__(self, config: RetroConfig, **_: Any):
        super().__init__(config=config)
        self.post_norm_residual = config.flavor == "megatron_core"

    def forward(self, training: bool, fused: bool) -> Callable[[tuple, Tensor, float], Tensor]:
        def bda(x: tuple, residual: Tensor, prob: float) -> Tensor:
            out, bias, normalised = x
            if bias is not None:
                out = out + bias
            base = normalised if self.post_norm_residual else residual
            return base + F.dropout(out, p=prob, training=training)

        return bda
