"""A stand-in for torchvision's Swin window attention that can hold fewer heads.

torchvision's `ShiftedWindowAttention` (V1 and V2) calls the functional
`shifted_window_attention`, which derives the head size as C // num_heads from the *input*
width C and reshapes the heads back to C: once heads are removed the qkv output no longer
has 3·C rows and the forward breaks. Extraction swaps in `WindowAttention`, which keeps the
same parameters (qkv, proj, the per-head relative position bias table or V2's cpb MLP and
logit scale) and buffers but carries `head_dim` explicitly, so plain row/column removal and
per-head table slicing then apply to it as to any fused-qkv block. The forward is the same
computation (padding, cyclic shift, shifted-window mask, cosine attention for V2) written
with ops that export to ONNX.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def is_torchvision_window_attention(m: nn.Module) -> bool:
    """torchvision.models.swin_transformer.ShiftedWindowAttention or its V2 (matched by name and origin)."""
    cls = type(m)
    return cls.__name__ in ("ShiftedWindowAttention", "ShiftedWindowAttentionV2") and cls.__module__.startswith(
        "torchvision."
    )


def window_per_head(m: nn.Module) -> list[tuple[str, int]]:
    """V2's per-head parameters besides the bias table: (name relative to m, head dim)."""
    if hasattr(m, "cpb_mlp") and isinstance(getattr(m, "logit_scale", None), nn.Parameter):
        return [("logit_scale", 0), ("cpb_mlp.2.weight", 0)]
    return []


class WindowAttention(nn.Module):
    """Shifted-window multi-head self-attention on [B, H, W, C] with an explicit head size."""

    def __init__(self, src: nn.Module):
        super().__init__()
        self.window_size, self.shift_size = list(src.window_size), list(src.shift_size)
        self.num_heads = src.num_heads
        self.head_dim = src.qkv.out_features // 3 // src.num_heads
        self.attention_dropout, self.dropout = src.attention_dropout, src.dropout
        self.qkv, self.proj = src.qkv, src.proj
        self.v2 = bool(window_per_head(src))
        if self.v2:
            self.logit_scale, self.cpb_mlp = src.logit_scale, src.cpb_mlp
            self.register_buffer("relative_coords_table", src.relative_coords_table)
        else:
            self.relative_position_bias_table = src.relative_position_bias_table
        self.register_buffer("relative_position_index", src.relative_position_index)

    def position_bias(self) -> torch.Tensor:
        """[1, heads, N, N] bias of every query/key position pair of a window."""
        table = (
            self.cpb_mlp(self.relative_coords_table).flatten(0, -2) if self.v2 else self.relative_position_bias_table
        )
        n = self.window_size[0] * self.window_size[1]
        bias = table[self.relative_position_index].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        return 16 * torch.sigmoid(bias) if self.v2 else bias

    def _mask(self, x: torch.Tensor, ph: int, pw: int, shift: list[int]) -> torch.Tensor:
        """[windows, N, N]: -100 between tokens that the cyclic shift brought from different regions."""
        wh, ww = self.window_size
        region = x.new_zeros((ph, pw))
        count = 0
        for hs in ((0, -wh), (-wh, -shift[0]), (-shift[0], None)):
            for ws in ((0, -ww), (-ww, -shift[1]), (-shift[1], None)):
                region[hs[0] : hs[1], ws[0] : ws[1]] = count
                count += 1
        region = region.view(ph // wh, wh, pw // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
        diff = region.unsqueeze(1) - region.unsqueeze(2)
        return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)

    def _attend(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [windows·B, heads, N, N] without the position bias, values) of x [windows·B, N, C]."""
        bias = self.qkv.bias
        if self.v2 and bias is not None:  # V2 has no key bias
            third = bias.numel() // 3
            bias = torch.cat([bias[:third], torch.zeros_like(bias[third : 2 * third]), bias[2 * third :]])
        qkv = F.linear(x, self.qkv.weight, bias)
        qkv = qkv.reshape(x.shape[0], x.shape[1], 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.v2:
            scale = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
            return F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * scale, v
        return (q * self.head_dim**-0.5) @ k.transpose(-2, -1), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        wh, ww = self.window_size
        x = F.pad(x, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))
        ph, pw = x.shape[1], x.shape[2]
        shift = [0 if wh >= ph else self.shift_size[0], 0 if ww >= pw else self.shift_size[1]]
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        nw, n = (ph // wh) * (pw // ww), wh * ww
        x = x.view(b, ph // wh, wh, pw // ww, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nw, n, c)
        attn, v = self._attend(x)
        attn = attn + self.position_bias()
        if sum(shift) > 0:
            attn = attn.view(b, nw, self.num_heads, n, n) + self._mask(x, ph, pw, shift).unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        attn = F.dropout(attn.softmax(-1), p=self.attention_dropout, training=self.training)
        x = (attn @ v).transpose(1, 2).reshape(b * nw, n, self.num_heads * self.head_dim)
        x = F.dropout(self.proj(x), p=self.dropout, training=self.training)
        x = x.view(b, ph // wh, pw // ww, wh, ww, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, -1)
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
        return x[:, :h, :w, :].contiguous()
