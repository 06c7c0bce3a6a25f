"""The leanest PyTorch GPT of a model_step config: the floor any GPT of that shape hits here.

No megatron-core, no parallel layers: pre-LayerNorm blocks with biases, rotary positions,
torch's SDPA (causal), GELU MLP, tied embeddings, F.cross_entropy. Same matmul shapes and
FLOPs as the toolkit's GPT twin of the same section, so model_step.py --compare-plain puts
the toolkit's overhead over bare PyTorch next to the matmul limit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Non-interleaved rotary embedding on x [b, heads, s, d]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Block(nn.Module):
    def __init__(self, h: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.fc1, self.fc2 = nn.Linear(h, ffn), nn.Linear(ffn, h)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(rotary(q, cos, sin), rotary(k, cos, sin), v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, h))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class PlainGPT(nn.Module):
    """forward(tokens, neighbors=None, labels=...) -> per-token loss [b, s], like the toolkit's models."""

    def __init__(self, section: dict):
        super().__init__()
        h, heads = section["hidden_size"], section["num_attention_heads"]
        self.embed = nn.Embedding(section["vocab_size"], h)
        self.blocks = nn.ModuleList(Block(h, heads, section["ffn_hidden_size"]) for _ in range(section["num_layers"]))
        self.ln_f = nn.LayerNorm(h)
        d = h // heads
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
        ang = torch.outer(torch.arange(section["seq_length"]).float(), inv)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, tokens: Tensor, neighbors: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, self.cos, self.sin)
        logits = F.linear(self.ln_f(x), self.embed.weight)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
