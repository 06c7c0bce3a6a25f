"""Retro's own modules, plugged into megatron-core TransformerLayer slots by specs.py.

Layout conventions (megatron-core's): hidden states are [s, b, h]. With n tokens,
l = n / m chunks, k neighbours of r tokens each:
  neighbour embeddings   [r, b*l*k, h]   batch order (sample, chunk, neighbour)
  neighbour mask         [b, l, k, r]    bool, True = missing/pad token (masked)
  encoded neighbours     [k*r, b*l, h]   what chunked cross-attention reads
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.attention import CrossAttention
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from torch import Tensor

from retro_toolkit.collections.retro.config import RetroConfig


class Norm(torch.nn.Module):
    """LayerNorm or RMSNorm per config, with the "1p" (zero-centred gamma) variant.

    torch's LayerNorm wrapper in megatron-core refuses zero-centred gamma and apex's fused
    norm needs CUDA, so the local specs use this one.
    """

    def __init__(self, config: RetroConfig, hidden_size: int, eps: float = 1e-5, **_: Any):
        super().__init__()
        self.eps = eps
        self.rms = config.normalization == "RMSNorm"
        self.zero_centered = config.layernorm_zero_centered_gamma
        init = torch.zeros if self.zero_centered else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight + 1 if self.zero_centered else self.weight
        if self.rms:
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        return F.layer_norm(x, (x.shape[-1],), weight, self.bias, self.eps)


class EncoderCrossAttention(CrossAttention):
    """Each neighbour attends to the decoder chunk that retrieved it.

    Queries are the k neighbours of a chunk ([r, b*l*k, h]); keys/values are projected once
    per chunk ([m, b*l, h]) and shared by its k neighbours instead of being recomputed.
    """

    def get_query_key_value_tensors(self, hidden_states, key_value_states, output_gate=False, split_qkv=True):
        query, key, value = super().get_query_key_value_tensors(
            hidden_states, key_value_states, output_gate=output_gate, split_qkv=split_qkv
        )
        repeat = query.size(1) // key.size(1)
        if repeat > 1:
            key = key.repeat_interleave(repeat, dim=1)
            value = value.repeat_interleave(repeat, dim=1)
        return query, key, value


@dataclass
class ChunkedCrossAttentionSubmodules:
    attention: Union[ModuleSpec, type]
    # Only the first CCA layer owns the neighbour encoder (a TransformerBlock's layer specs).
    encoder: Optional[TransformerBlockSubmodules] = None


class ChunkedCrossAttention(MegatronModule):
    """Retro's chunked cross-attention (CCA), in a TransformerLayer's cross_attention slot.

    Tokens at positions [(i+1)m - 1, (i+2)m - 2] attend to the k*r encoded tokens of chunk
    i's neighbours; the first m - 1 tokens attend to none (output exactly 0). A chunk whose
    neighbour tokens are all masked also gets exactly 0, so "no neighbours" equals gate 0.
    Returns a dict for ChunkedCrossAttentionBDA; "context" carries the encoded neighbours
    on to the later CCA layers (TransformerLayer forwards it).
    """

    def __init__(
        self,
        config: RetroConfig,
        submodules: ChunkedCrossAttentionSubmodules,
        layer_number: int = 1,
        pg_collection: Any = None,
        **kwargs: Any,
    ):
        super().__init__(config=config)
        self.attention = build_module(
            submodules.attention, config=config, layer_number=layer_number, pg_collection=pg_collection, **kwargs
        )
        self.encoder = None
        self.encoder_rotary = None
        if submodules.encoder is not None:
            enc_config = config.encoder_config()
            self.encoder = TransformerBlock(
                config=enc_config, spec=submodules.encoder, pre_process=True, post_process=True, pg_collection=pg_collection
            )
            if config.position_embedding_type == "rope":
                self.encoder_rotary = RotaryEmbedding(
                    kv_channels=config.kv_channels,
                    rotary_percent=config.rotary_percent,
                    rotary_interleaved=config.rotary_interleaved,
                    rotary_base=config.rotary_base,
                    use_cpu_initialization=config.use_cpu_initialization,
                )

    def encode(self, chunks: Tensor, neighbors: Tensor, mask: Tensor) -> Tensor:
        """chunks [m, b*l, h] (decoder), neighbors [r, b*l*k, h], mask [b, l, k, r] -> [k*r, b*l, h]."""
        b, l, k, r = mask.shape
        self_mask = mask.reshape(b * l * k, 1, 1, r)
        rope = self.encoder_rotary(r) if self.encoder_rotary is not None else None
        out = self.encoder(
            hidden_states=neighbors, attention_mask=self_mask, context=chunks, context_mask=None, rotary_pos_emb=rope
        )
        h = out.size(-1)
        return out.reshape(r, b * l, k, h).permute(2, 0, 1, 3).reshape(k * r, b * l, h)

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor] = None,
        key_value_states: Optional[Tensor] = None,
        inference_context: Any = None,
        **_: Any,
    ) -> dict:
        gate = self.config.retrieval_gate
        if key_value_states is None or attention_mask is None or gate == 0:
            return {"context": key_value_states, "output": None}
        n, b, h = hidden_states.shape
        m = self.config.chunk_length
        l = n // m
        mask = attention_mask  # [b, l, k, r]
        kr = mask.shape[2] * mask.shape[3]

        if self.encoder is not None:
            chunks = hidden_states.reshape(l, m, b, h).permute(1, 2, 0, 3).reshape(m, b * l, h)
            key_value_states = self.encode(chunks, key_value_states, mask)

        # Shift by m - 1 so that row j of chunk i is position (i+1)m - 1 + j.
        shifted = F.pad(hidden_states[m - 1 :], (0, 0, 0, 0, 0, m - 1))
        queries = shifted.reshape(l, m, b, h).permute(1, 2, 0, 3).reshape(m, b * l, h)
        out, bias = self.attention(queries, attention_mask=mask.reshape(b * l, 1, 1, kr), key_value_states=key_value_states)
        if bias is not None:
            out = out + bias
        has_any = ~mask.reshape(b * l, kr).all(dim=-1)
        out = torch.where(has_any[None, :, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
        if gate != 1:
            out = out * gate
        out = out.reshape(m, b, l, h).permute(2, 0, 1, 3).reshape(l * m, b, h)[: n - m + 1]
        out = F.pad(out, (0, 0, 0, 0, m - 1, 0))
        return {"context": key_value_states, "output": out}


class ChunkedCrossAttentionBDA(MegatronModule):
    """Dropout-add for ChunkedCrossAttention's dict; returns the residual untouched when off."""

    def __init__(self, config: RetroConfig, **_: Any):
        super().__init__(config=config)

    def forward(self, training: bool, fused: bool) -> Callable[[dict, Tensor, float], Tensor]:
        def bda(x: dict, residual: Tensor, prob: float) -> Tensor:
            out = x["output"]
            if out is None:
                return residual
            return residual + F.dropout(out, p=prob, training=training)

        return bda
