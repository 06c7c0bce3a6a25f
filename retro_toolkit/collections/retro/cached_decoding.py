"""Chunked cross-attention while generating with a KV cache (a RetroInferenceContext).

Generation feeds the sequence in pieces. A CCA layer then encodes each chunk's neighbours
once, when the piece completing the chunk arrives (the first CCA layer), projects them to
keys and values once per layer and chunk (NeighbourCrossAttention), and gives each new
position the output the full forward pass gives it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from megatron.core.transformer.attention import CrossAttention
from torch import Tensor

from retro_toolkit.collections.retro.inference import RetroInferenceContext, neighbor_mask

if TYPE_CHECKING:
    from retro_toolkit.collections.retro.chunked_cross_attention import ChunkedCrossAttention


class NeighbourCrossAttention(CrossAttention):
    """megatron-core's CrossAttention, able to reuse one key/value projection across calls.

    While decoding, every token of a chunk attends to the same encoded neighbours. With
    `kv_cache` set (cached_output sets one dict per layer and chunk) their key/value
    projection is computed on the first call and reused after.
    """

    kv_cache: Optional[dict] = None

    def get_query_key_value_tensors(self, hidden_states, key_value_states, output_gate=False, split_qkv=True):
        cache = self.kv_cache
        if cache is None or "kv" not in cache:
            query, key, value = super().get_query_key_value_tensors(
                hidden_states, key_value_states, output_gate, split_qkv
            )
            if cache is not None:
                cache["kv"] = (key, value)
            return query, key, value
        key, value = cache["kv"]
        query, _ = self.linear_q(hidden_states)
        query = query.view(*query.size()[:-1], self.num_attention_heads_per_partition,
                           self.hidden_size_per_attention_head)
        return query, key, value


def cached_output(cca: ChunkedCrossAttention, hidden_states: Tensor, ctx: RetroInferenceContext) -> Optional[Tensor]:
    """The CCA output for positions [offset, offset + s) of a RetroInferenceContext; None while
    no position reads a chunk yet."""
    s, b, h = hidden_states.shape
    m = cca.config.chunk_length
    start = ctx.sequence_len_offset
    if cca.encoder is not None:
        if ctx.cca_inputs is None:
            ctx.cca_inputs = hidden_states.new_zeros(ctx.max_sequence_length, b, h)
        ctx.cca_inputs[start : start + s] = hidden_states
        for i, (neighbors, mask) in ctx.new_neighbors.items():
            ctx.encoded[i] = cca.encode(ctx.cca_inputs[i * m : (i + 1) * m], neighbors, mask)
    first = (start + 1) // m - 1  # the chunk read by position `start`
    last = (start + s) // m - 1  # ... and by position start + s - 1
    if last < 0:
        return None
    out = hidden_states.new_zeros(s, b, h)
    try:
        _attend_chunks(cca, hidden_states, ctx, start, first, last, out)
    finally:
        if isinstance(cca.attention, NeighbourCrossAttention):
            cca.attention.kv_cache = None
    return out


def _attend_chunks(cca: ChunkedCrossAttention, hidden_states: Tensor, ctx: RetroInferenceContext, start: int,
                   first: int, last: int, out: Tensor) -> None:
    s, b = hidden_states.shape[:2]
    m = cca.config.chunk_length
    for i in range(max(first, 0), last + 1):
        lo, hi = max(start, (i + 1) * m - 1), min(start + s, (i + 2) * m - 1)
        mask = neighbor_mask(ctx.neighbor_tokens[:b, i], cca.config.neighbor_pad_id)  # [b, k, r]
        if isinstance(cca.attention, NeighbourCrossAttention):
            cca.attention.kv_cache = ctx.cca_kv.setdefault((id(cca), i), {})
        out[lo - start : hi - start] = cca.attend(
            hidden_states[lo - start : hi - start], ctx.encoded[i], mask, slice(lo - i * m, hi - i * m)
        )
