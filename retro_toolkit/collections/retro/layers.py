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

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.attention import CrossAttention, SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from torch import Tensor

from retro_toolkit.collections.retro.config import RetroConfig
from retro_toolkit.collections.retro.inference import neighbor_mask


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


class SDPAttention(MegatronModule):
    """Core attention through torch's scaled_dot_product_attention, for the local specs.

    A drop-in for megatron-core's DotProductAttention (same constructor and call:
    query [sq, b, np, hn], key/value [sk, b, ng, hn], mask True = masked, output
    [sq, b, np * hn]). It never materialises the [b, np, sq, sk] score tensor on CPU
    (torch's flash kernel), skips the blocks above the diagonal under a causal mask and
    reads the [s, b, ...] layout through strides instead of copying it.

    Semantics kept: a causal layer without a mask is exactly causal (masked scores
    contribute exact zeros, so logits never depend on later tokens); a given mask is used
    as is (padding). Differences: scores are not materialised, so results agree with
    DotProductAttention to float rounding, not bit for bit; a query row whose keys are
    all masked gives 0 here (DotProductAttention gives the mean of the values), but Retro's
    masks never hold one (`attendable`).
    """

    def __init__(
        self,
        config: RetroConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Any = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism.")
        if getattr(config, "softmax_type", "vanilla") != "vanilla" or getattr(config, "window_size", None):
            raise ValueError("SDPAttention supports vanilla softmax without sliding windows only.")
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        head_dim = config.kv_channels
        # DotProductAttention divides the scale by layer_number under
        # apply_query_key_layer_scaling and multiplies the scores back in its softmax:
        # the net scale is this one.
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Any = None,
    ) -> Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor an attention bias.")
        sq, b, np_, hn = query.shape
        groups = key.size(2)
        if groups != np_:
            key = key.repeat_interleave(np_ // groups, dim=2)
            value = value.repeat_interleave(np_ // groups, dim=2)
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        mask = None
        causal = False
        if attention_mask is not None:
            mask = ~attention_mask  # megatron: True = masked; torch: True = attend
        elif mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal):
            causal = True
        elif mask_type == AttnMaskType.causal_bottom_right and sq != key.size(0):
            raise ValueError("SDPAttention: bottom-right causal masks need sq == sk.")
        elif mask_type == AttnMaskType.causal_bottom_right:
            causal = True
        # [s, b, np, hn] -> [b, np, s, hn] as strided views (no copies).
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        p = self.dropout_p if self.training else 0.0
        if p > 0:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal, scale=self.softmax_scale
                )
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)


class EncoderCrossAttention(CrossAttention):
    """Each neighbour attends to the decoder chunk that retrieved it.

    Queries are the k neighbours of a chunk ([r, b*l*k, h]); keys/values are projected once
    per chunk ([m, b*l, h]) and shared by its k neighbours instead of being recomputed.
    Returns (output, bias, its normalised input) for EncoderCrossAttentionBDA.
    """

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


class NeighbourCrossAttention(CrossAttention):
    """megatron-core's CrossAttention, able to reuse one key/value projection across calls.

    While decoding, every token of a chunk attends to the same encoded neighbours. With
    `kv_cache` set (ChunkedCrossAttention sets one dict per layer and chunk during cached
    decoding) their key/value projection is computed on the first call and reused after.
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
            submodules.attention, config=config, layer_number=layer_number, pg_collection=pg_collection, **kwargs
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
            return {"context": None, "output": self._forward_cached(hidden_states, inference_context)}
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
        rope = None
        if self.cca_rotary is not None:
            r = mask.shape[3]
            q_pos = self.cca_rotary(max(2 * m - 1, r))
            rope = (q_pos[m - 1 : 2 * m - 1], q_pos[:r].repeat(kr // r, 1, 1, 1))
        out, bias = self.attention(
            queries, attention_mask=attendable(mask.reshape(b * l, 1, 1, kr)), key_value_states=key_value_states,
            rotary_pos_emb=rope,
        )
        if bias is not None:
            out = out + bias
        has_any = ~mask.reshape(b * l, kr).all(dim=-1)
        out = torch.where(has_any[None, :, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
        if gate != 1:
            out = out * gate
        out = out.reshape(m, b, l, h).permute(2, 0, 1, 3).reshape(l * m, b, h)[: n - m + 1]
        out = F.pad(out, (0, 0, 0, 0, m - 1, 0))
        return {"context": key_value_states, "output": out}


    def _forward_cached(self, hidden_states: Tensor, ctx: Any) -> Optional[Tensor]:
        """The CCA output for positions [offset, offset + s) of a RetroInferenceContext."""
        s, b, h = hidden_states.shape
        m = self.config.chunk_length
        start = ctx.sequence_len_offset
        if self.encoder is not None:
            if ctx.cca_inputs is None:
                ctx.cca_inputs = hidden_states.new_zeros(ctx.max_sequence_length, b, h)
            ctx.cca_inputs[start : start + s] = hidden_states
            for i, (neighbors, mask) in ctx.new_neighbors.items():
                ctx.encoded[i] = self.encode(ctx.cca_inputs[i * m : (i + 1) * m], neighbors, mask)
        first = (start + 1) // m - 1  # the chunk read by position `start`
        last = (start + s) // m - 1  # ... and by position start + s - 1
        if last < 0:
            return None
        out = hidden_states.new_zeros(s, b, h)
        try:
            self._attend_chunks(hidden_states, ctx, start, first, last, out)
        finally:
            if isinstance(self.attention, NeighbourCrossAttention):
                self.attention.kv_cache = None
        return out

    def _attend_chunks(self, hidden_states: Tensor, ctx: Any, start: int, first: int, last: int, out: Tensor) -> None:
        s, b = hidden_states.shape[:2]
        m = self.config.chunk_length
        for i in range(max(first, 0), last + 1):
            lo, hi = max(start, (i + 1) * m - 1), min(start + s, (i + 2) * m - 1)
            mask = neighbor_mask(ctx.neighbor_tokens[:b, i], self.config.neighbor_pad_id)  # [b, k, r]
            k, r = mask.shape[1:]
            rope = None
            if self.cca_rotary is not None:
                pos = self.cca_rotary(max(2 * m - 1, r))
                rope = (pos[lo - i * m : hi - i * m], pos[:r].repeat(k, 1, 1, 1))
            if isinstance(self.attention, NeighbourCrossAttention):
                self.attention.kv_cache = ctx.cca_kv.setdefault((id(self), i), {})
            o, bias = self.attention(hidden_states[lo - start : hi - start],
                                     attention_mask=attendable(mask.reshape(b, 1, 1, k * r)),
                                     key_value_states=ctx.encoded[i], rotary_pos_emb=rope)
            if bias is not None:
                o = o + bias
            has_any = ~mask.reshape(b, k * r).all(dim=-1)
            o = torch.where(has_any[None, :, None], o, torch.zeros((), dtype=o.dtype, device=o.device))
            out[lo - start : hi - start] = o if self.config.retrieval_gate == 1 else o * self.config.retrieval_gate


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
