"""Transformer building blocks whose heads and MLP neurons can be removed exactly.

`SelfAttention` keeps separate q, k, v, out nn.Linear layers and reads its shape only
from the attributes `num_heads` and `head_dim`, so extraction can drop heads by
slicing the projections and lowering `num_heads` (compress.groups.AttentionUnit).
"""

from __future__ import annotations

from torch import nn


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        inner = self.num_heads * self.head_dim
        self.q = nn.Linear(dim, inner)
        self.k = nn.Linear(dim, inner)
        self.v = nn.Linear(dim, inner)
        self.out = nn.Linear(inner, dim)

    def forward(self, x, mask=None):
        b, t, _ = x.shape
        h, d = self.num_heads, self.head_dim
        q = self.q(x).reshape(b, t, h, d).transpose(1, 2)
        k = self.k(x).reshape(b, t, h, d).transpose(1, 2)
        v = self.v(x).reshape(b, t, h, d).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (d**-0.5)
        if mask is not None:  # additive, broadcast over heads: (b, 1, 1, t)
            att = att + mask
        y = att.softmax(-1) @ v
        return self.out(y.transpose(1, 2).reshape(b, t, h * d))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderBlock(nn.Module):
    """Pre-LN (ViT) or post-LN (BERT) encoder block."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, pre_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        self.pre_norm = pre_norm
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_hidden)

    def forward(self, x, mask=None):
        if self.pre_norm:
            x = x + self.attn(self.norm1(x), mask)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x, mask))
        return self.norm2(x + self.mlp(x))
