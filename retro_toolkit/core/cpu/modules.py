"""Local replacements for megatron-core modules that need Transformer Engine, apex or CUDA.

The local (non-Transformer-Engine) layer specs put these in megatron-core's slots: a norm
with the zero-centred ("1p") gamma and RMSNorm without apex, and core attention through
torch's scaled_dot_product_attention.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor


class Norm(torch.nn.Module):
    """LayerNorm or RMSNorm per config, with the "1p" (zero-centred gamma) variant.

    torch's LayerNorm wrapper in megatron-core refuses zero-centred gamma and apex's fused
    norm needs CUDA, so the local specs use this one.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: Any):
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
    masks never hold one (chunked_cross_attention.attendable).
    """

    def __init__(
        self,
        config: TransformerConfig,
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
