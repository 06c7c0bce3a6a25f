"""Retro's chunked cross-attention (CCA), in a TransformerLayer's cross-attention slots.

Layout conventions (megatron-core's): hidden states are [s, b, h]. With n tokens,
l = n / m chunks, k neighbours of r tokens each:
  neighbour embeddings   [r, b*l*k, h]   batch order (sample, chunk, neighbour)
  neighbour mask         [b, l, k, r]    bool, True = missing/pad token (masked)
  encoded neighbours     [k*r, b*l, h]   what chunked cross-attention reads

The first CCA layer also runs the neighbour encoder. Training and cached decoding
(cached_decoding.py) share `ChunkedCrossAttention.attend`, the step from a chunk's queries
to its gated output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from torch import Tensor

from retro_toolkit.collections.retro.cached_decoding import cached_output
from retro_toolkit.collections.retro.config import RetroConfig


def attendable(mask: Tensor) -> Tensor:
    """An attention mask [..., keys] (True = masked) whose rows masked throughout get key 0 back.

    What a kernel returns for a fully masked row is its own convention: torch's CPU kernels
    give 0, megatron-core's unfused softmax the mean of the values, CUDA's memory-efficient
    SDPA has given NaN, and 0 x NaN poisons whatever reads it. Such rows here are a missing
    neighbour in the encoder (its keys are masked again in CCA) or a chunk with no neighbour
    at all in CCA (its output is set to 0 after), so key 0 only has to be finite.
    """
    full = mask.all(dim=-1, keepdim=True)
    first = torch.zeros_like(mask)
    first[..., 0] = True
    return mask & ~(full & first)


@dataclass
class ChunkedCrossAttentionSubmodules:
    attention: Union[ModuleSpec, type]
    # Only the first CCA layer owns the neighbour encoder (a TransformerBlock's layer specs).
    encoder: Optional[TransformerBlockSubmodules] = None


def _rotary(config: RetroConfig) -> RotaryEmbedding:
    """The decoder's rotary embedding settings, for positions inside a neighbour or a chunk."""
    return RotaryEmbedding(
        kv_channels=config.kv_channels,
        rotary_percent=config.rotary_percent,
        rotary_interleaved=config.rotary_interleaved,
        rotary_base=config.rotary_base,
        rope_scaling=config.rope_scaling_factor is not None,
        rope_scaling_factor=config.rope_scaling_factor or 8.0,
        use_cpu_initialization=config.use_cpu_initialization,
    )


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
            submodules.attention, config=config.multi_head(), layer_number=layer_number, pg_collection=pg_collection, **kwargs
        )
        if config.cca_zero_init and config.perform_initialization:
            with torch.no_grad():
                for param in self.attention.linear_proj.parameters():
                    param.zero_()
        self.encoder = None
        self.encoder_rotary = None
        self.cca_rotary = _rotary(config) if config.cca_rotary else None
        if submodules.encoder is not None:
            enc_config = config.encoder_config()
            # Megatron-LM's retriever hands its last layer's output to CCA unnormalised; the
            # spec carries a final norm only with config.encoder_final_norm.
            self.encoder = TransformerBlock(
                config=enc_config, spec=submodules.encoder, pre_process=True,
                post_process=config.encoder_final_norm, pg_collection=pg_collection
            )
            if config.encoder_rotary:
                self.encoder_rotary = _rotary(config)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """The attention's state under `prefix`; the encoder is a block of its own (no layer offsets)."""
        from megatron.core.transformer.utils import sharded_state_dict_default

        out = sharded_state_dict_default(self.attention, f"{prefix}attention.", sharded_offsets, metadata)
        if self.encoder is not None:
            enc_meta = dict(metadata or {})
            enc_meta["non_homogeneous_layers"] = True  # the first encoder layer has cross-attention
            out.update(self.encoder.sharded_state_dict(f"{prefix}encoder.", (), enc_meta))
        return out

    def encode(self, chunks: Tensor, neighbors: Tensor, mask: Tensor) -> Tensor:
        """chunks [m, b*l, h] (decoder), neighbors [r, b*l*k, h], mask [b, l, k, r] -> [k*r, b*l, h]."""
        b, l, k, r = mask.shape
        self_mask = attendable(mask.reshape(b * l * k, 1, 1, r))
        rope = self.encoder_rotary(r) if self.encoder_rotary is not None else None
        out = self.encoder(
            hidden_states=neighbors, attention_mask=self_mask, context=chunks, context_mask=None, rotary_pos_emb=rope
        )
        h = out.size(-1)
        return out.reshape(r, b * l, k, h).permute(2, 0, 1, 3).reshape(k * r, b * l, h)

    def attend(self, queries: Tensor, neighbors: Tensor, mask: Tensor, rows: slice) -> Tensor:
        """The gated CCA output [s, B, h] of queries [s, B, h] reading encoded neighbours [k*r, B, h].

        mask [B, k, r] is True where a neighbour token is masked; `rows` places the queries in
        their chunk's window of 2m - 1 positions (for cca_rotary). A B whose neighbours are all
        masked gets exactly 0.
        """
        B, k, r = mask.shape
        flat = mask.reshape(B, k * r)
        rope = None
        if self.cca_rotary is not None:
            pos = self.cca_rotary(max(2 * self.config.chunk_length - 1, r))
            rope = (pos[rows], pos[:r].repeat(k, 1, 1, 1))
        out, bias = self.attention(
            queries, attention_mask=attendable(flat.reshape(B, 1, 1, k * r)), key_value_states=neighbors,
            rotary_pos_emb=rope,
        )
        if bias is not None:
            out = out + bias
        has_any = ~flat.all(dim=-1)
        out = torch.where(has_any[None, :, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
        gate = self.config.retrieval_gate
        return out if gate == 1 else out * gate

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor] = None,
        key_value_states: Optional[Tensor] = None,
        inference_context: Any = None,
        **_: Any,
    ) -> dict:
        gate = self.config.retrieval_gate
        if gate != 0 and hasattr(inference_context, "new_neighbors"):
            return {"context": None, "output": cached_output(self, hidden_states, inference_context)}
        if key_value_states is None or attention_mask is None or gate == 0:
            return {"context": key_value_states, "output": None}
        n, b, h = hidden_states.shape
        m = self.config.chunk_length
        l = n // m
        mask = attention_mask  # [b, l, k, r]

        if self.encoder is not None:
            chunks = hidden_states.reshape(l, m, b, h).permute(1, 2, 0, 3).reshape(m, b * l, h)
            key_value_states = self.encode(chunks, key_value_states, mask)

        # Shift by m - 1 so that row j of chunk i is position (i+1)m - 1 + j.
        shifted = F.pad(hidden_states[m - 1 :], (0, 0, 0, 0, 0, m - 1))
        queries = shifted.reshape(l, m, b, h).permute(1, 2, 0, 3).reshape(m, b * l, h)
        out = self.attend(queries, key_value_states, mask.reshape(b * l, *mask.shape[2:]), slice(m - 1, 2 * m - 1))
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
