"""An exportable stand-in for nn.MultiheadAttention with fewer heads.

nn.MultiheadAttention keeps its head count in C++-side checks (embed_dim must equal
num_heads × head_dim and the in/out widths), so it cannot hold a pruned head count.
Extraction replaces it with `SplitHeadAttention`: separate q/k/v/out nn.Linear layers with
the remaining heads' rows, computing the same function with the same call signature, and
exporting to ONNX as plain MatMul/Softmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def mha_prunable(m: nn.MultiheadAttention) -> bool:
    """Heads are removable when q, k, v share one packed projection and nothing is appended."""
    return bool(m._qkv_same_embed_dim) and m.bias_k is None and not m.add_zero_attn


class SplitHeadAttention(nn.Module):
    """softmax(q kᵀ/√d + mask) v per head, then `out`; forward(query, key, value, ...) as MHA."""

    def __init__(self, mha: nn.MultiheadAttention, keep_heads: list[int]):
        super().__init__()
        e, d = mha.embed_dim, mha.head_dim
        self.num_heads, self.head_dim, self.batch_first = len(keep_heads), d, mha.batch_first
        self.dropout = mha.dropout
        rows = torch.tensor([h * d + j for h in keep_heads for j in range(d)], dtype=torch.long)
        w, b = mha.in_proj_weight.detach(), mha.in_proj_bias
        self.q, self.k, self.v = (nn.Linear(e, len(rows), bias=b is not None) for _ in range(3))
        for i, lin in enumerate((self.q, self.k, self.v)):
            lin.weight.data.copy_(w[i * e : (i + 1) * e][rows])
            if b is not None:
                lin.bias.data.copy_(b.detach()[i * e : (i + 1) * e][rows])
        self.out = nn.Linear(len(rows), e, bias=mha.out_proj.bias is not None)
        self.out.weight.data.copy_(mha.out_proj.weight.detach()[:, rows])
        if mha.out_proj.bias is not None:
            self.out.bias.data.copy_(mha.out_proj.bias.detach())

    def _heads(self, x):
        n, length, _ = x.shape
        return x.view(n, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        batched = query.dim() == 3
        if not batched:
            query, key, value = (t.unsqueeze(1 if not self.batch_first else 0) for t in (query, key, value))
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = self._heads(self.q(query)), self._heads(self.k(key)), self._heads(self.v(value))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        scores = scores + additive_mask(attn_mask, key_padding_mask, scores, is_causal)
        attn = F.dropout(scores.softmax(-1), self.dropout, self.training)
        out = (attn @ v).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
        out = self.out(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1 if not self.batch_first else 0)
        weights = None
        if need_weights:
            weights = attn.mean(1) if average_attn_weights else attn
        return out, weights


def additive_mask(attn_mask, key_padding_mask, scores, is_causal):
    """MHA's masks as one additive float mask (True / -inf = not attended)."""
    add = torch.zeros((), dtype=scores.dtype, device=scores.device)
    if attn_mask is None and is_causal:
        lq, s = scores.shape[-2:]
        attn_mask = torch.ones(lq, s, dtype=torch.bool, device=scores.device).triu(1)
    for m, shape in ((attn_mask, None), (key_padding_mask, "kpm")):
        if m is None:
            continue
        m = torch.zeros_like(m, dtype=scores.dtype).masked_fill(m, float("-inf")) if m.dtype == torch.bool else m
        if shape == "kpm":
            m = m[:, None, None, :]
        elif m.dim() == 3:
            m = m.view(scores.shape[0], -1, *m.shape[-2:])
        add = add + m
    return add
