"""megatron-core's self-attention with a cheaper rotary embedding, for the local specs.

The rotation is the one megatron-core's unfused path applies, written into one output
tensor (no rotate-half concatenations) with cos/sin computed once per forward pass.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from megatron.core.transformer.attention import SelfAttention
from torch import Tensor


class _Rope(torch.autograd.Function):
    """Rotary embedding (non-interleaved halves) on x [s, b, n, d] with cos/sin [s, 1, 1, rot/2].

    out1 = x1 cos - x2 sin, out2 = x2 cos + x1 sin on the first `rot` channels, the rest
    passes through: the same rotation as megatron-core's unfused _apply_rotary_pos_emb_bshd,
    written into one output without its rotate-half concatenations and negations (and
    without saving x: the backward is the inverse rotation of the gradient).
    """

    @staticmethod
    def _rotate(x: Tensor, cos: Tensor, sin: Tensor, negate_sin: bool) -> Tensor:
        half = cos.shape[-1]
        rot = 2 * half
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        x1, x2 = x[..., :half], x[..., half:rot]
        o1, o2 = out[..., :half], out[..., half:rot]
        sign = 1.0 if negate_sin else -1.0
        torch.mul(x1, cos, out=o1)
        o1.addcmul_(x2, sin, value=sign)
        torch.mul(x2, cos, out=o2)
        o2.addcmul_(x1, sin, value=-sign)
        if rot < x.shape[-1]:
            out[..., rot:].copy_(x[..., rot:])
        return out

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _Rope._rotate(x, cos, sin, negate_sin=False)

    @staticmethod
    def backward(ctx, grad: Tensor):
        cos, sin = ctx.saved_tensors
        return _Rope._rotate(grad, cos, sin, negate_sin=True), None, None


_ROPE_CACHE: list = []


def _cos_sin(freqs: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin of the first half of megatron-core's [s, 1, 1, rot] = cat(f, f) frequencies.

    Every layer gets the same freqs tensor in one forward pass: compute them once.
    """
    for entry in _ROPE_CACHE:
        if entry[0] is freqs and entry[1] == dtype:
            return entry[2], entry[3]
    half = freqs.shape[-1] // 2
    f = freqs[..., :half]
    cos, sin = torch.cos(f).to(dtype), torch.sin(f).to(dtype)
    _ROPE_CACHE.insert(0, (freqs, dtype, cos, sin))
    del _ROPE_CACHE[4:]
    return cos, sin


class RetroSelfAttention(SelfAttention):
    """megatron-core's SelfAttention with the rotary embedding applied by _Rope.

    Same weights, same maths; the rotation is done inside get_query_key_value_tensors and
    megatron-core's forward is called without rotary_pos_emb. Anything this does not
    cover (interleaved or multi-latent rope, inference, packed sequences, per-layer no-rope
    lists, a (q, k) pair of embeddings) goes through megatron-core's own path.
    """

    _rope: Optional[Tensor] = None
    _rope_offset: int = 0

    def forward(self, *args: Any, **kwargs: Any):
        rope = kwargs.get("rotary_pos_emb")
        c = self.config
        inference = kwargs.get("inference_context")
        # With megatron-core's static KV cache, rotating here stores rotated keys, so each
        # step rotates its own query and key once instead of the whole cache again.
        cached = inference is not None and getattr(inference, "is_static_batching", lambda: False)()
        if (
            len(args) > 4
            or not isinstance(rope, Tensor)
            or (inference is not None and not cached)
            or kwargs.get("inference_params") is not None
            or kwargs.get("packed_seq_params") is not None
            or c.rotary_interleaved
            or getattr(c, "position_embedding_type", "rope") != "rope"
            or c.multi_latent_attention
            or c.no_rope_freq
            or c.apply_rope_fusion
            or c.attention_output_gate
        ):
            return super().forward(*args, **kwargs)
        kwargs["rotary_pos_emb"] = None
        self._rope = rope
        self._rope_offset = inference.sequence_len_offset if cached else 0
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._rope = None

    def get_query_key_value_tensors(self, *args: Any, **kwargs: Any):
        out = super().get_query_key_value_tensors(*args, **kwargs)
        if self._rope is None:
            return out
        query, key, value = out
        cos, sin = _cos_sin(self._rope, query.dtype)
        if self._rope_offset or cos.shape[0] != query.shape[0]:
            span = slice(self._rope_offset, self._rope_offset + query.shape[0])
            cos, sin = cos[span], sin[span]
        return _Rope.apply(query, cos, sin), _Rope.apply(key, cos, sin), value
