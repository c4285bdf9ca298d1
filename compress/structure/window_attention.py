"""torchvision's window attentions (Swin V1/V2, MaxViT) with an explicit head size.

torchvision's `ShiftedWindowAttention` (V1 and V2) calls the functional
`shifted_window_attention`, which derives the head size as C // num_heads from the *input*
width C and reshapes the heads back to C; MaxViT's `RelativePositionalMultiHeadAttention`
reads `n_heads`/`head_dim` but also reshapes its heads back to the input width. Once heads
are removed both forwards break. Extraction therefore gives the module (same class, same
parameters: qkv, proj, per-head relative position bias table or V2's cpb MLP and logit
scale) a forward that computes the same function with `head_dim` kept explicitly, as an
instance attribute marked by `explicit_heads` ("swin" / "maxvit"); `reinstall` sets it
again on a reloaded model. Plain row/column removal and per-head table slicing then apply
as to any fused-qkv block. The forwards export to ONNX.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from torch import nn


def torchvision_form(m: nn.Module) -> str:
    """ "swin" (ShiftedWindowAttention, V2 too), "maxvit" (RelativePositionalMultiHeadAttention) or ""."""
    cls = type(m)
    if not cls.__module__.startswith("torchvision."):
        return ""
    if cls.__name__ in ("ShiftedWindowAttention", "ShiftedWindowAttentionV2"):
        return "swin"
    return "maxvit" if cls.__name__ == "RelativePositionalMultiHeadAttention" else ""


def window_per_head(m: nn.Module) -> list[tuple[str, int]]:
    """Swin V2's per-head parameters besides the bias table: (name relative to m, head dim)."""
    if hasattr(m, "cpb_mlp") and isinstance(getattr(m, "logit_scale", None), nn.Parameter):
        return [("logit_scale", 0), ("cpb_mlp.2.weight", 0)]
    return []


def install(m: nn.Module, form: str) -> None:
    """Give `m` the explicit-head-size forward of its form (before its head count changes)."""
    if form == "swin" and not isinstance(getattr(m, "head_dim", None), int):
        m.head_dim = m.qkv.out_features // 3 // m.num_heads
    m.explicit_heads = form
    m.forward = types.MethodType(_swin_forward if form == "swin" else _maxvit_forward, m)


def reinstall(model: nn.Module) -> None:
    """After `load_compressed` restored the attributes: the forwards of the modules marked `explicit_heads`."""
    for m in model.modules():
        if getattr(m, "explicit_heads", None) in ("swin", "maxvit"):
            install(m, m.explicit_heads)


def _maxvit_forward(self, x: torch.Tensor) -> torch.Tensor:
    """MaxViT's attention on [B, G, P, D] with the heads merged back to n_heads·head_dim, not D."""
    b, g, p, _ = x.shape
    q, k, v = (t.reshape(b, g, p, self.n_heads, self.head_dim).transpose(2, 3) for t in self.to_qkv(x).chunk(3, -1))
    scores = q @ (k * self.scale_factor).transpose(-2, -1) + self.get_relative_positional_bias()
    out = (scores.softmax(-1) @ v).transpose(2, 3).reshape(b, g, p, self.n_heads * self.head_dim)
    return self.merge(out)


def _position_bias(m) -> torch.Tensor:
    """[1, heads, N, N] bias of every query/key position pair of a window."""
    v2 = bool(window_per_head(m))
    table = m.cpb_mlp(m.relative_coords_table).flatten(0, -2) if v2 else m.relative_position_bias_table
    n = m.window_size[0] * m.window_size[1]
    bias = table[m.relative_position_index].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
    return 16 * torch.sigmoid(bias) if v2 else bias


def _shift_mask(m, x: torch.Tensor, ph: int, pw: int, shift: list[int]) -> torch.Tensor:
    """[windows, N, N]: -100 between tokens that the cyclic shift brought from different regions."""
    wh, ww = m.window_size
    region = x.new_zeros((ph, pw))
    count = 0
    for hs in ((0, -wh), (-wh, -shift[0]), (-shift[0], None)):
        for ws in ((0, -ww), (-ww, -shift[1]), (-shift[1], None)):
            region[hs[0] : hs[1], ws[0] : ws[1]] = count
            count += 1
    region = region.view(ph // wh, wh, pw // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    diff = region.unsqueeze(1) - region.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


def _scores(m, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [windows·B, heads, N, N] without the position bias, values) of x [windows·B, N, C]."""
    bias, v2 = m.qkv.bias, bool(window_per_head(m))
    if v2 and bias is not None:  # V2 has no key bias
        third = bias.numel() // 3
        bias = torch.cat([bias[:third], torch.zeros_like(bias[third : 2 * third]), bias[2 * third :]])
    qkv = F.linear(x, m.qkv.weight, bias)
    qkv = qkv.reshape(x.shape[0], x.shape[1], 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if v2:
        scale = torch.clamp(m.logit_scale, max=math.log(100.0)).exp()
        return F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * scale, v
    return (q * m.head_dim**-0.5) @ k.transpose(-2, -1), v


def _swin_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Shifted-window multi-head self-attention on [B, H, W, C] (padding, cyclic shift, mask)."""
    b, h, w, c = x.shape
    wh, ww = self.window_size
    x = F.pad(x, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))
    ph, pw = x.shape[1], x.shape[2]
    shift = [0 if wh >= ph else self.shift_size[0], 0 if ww >= pw else self.shift_size[1]]
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    nw, n = (ph // wh) * (pw // ww), wh * ww
    x = x.view(b, ph // wh, wh, pw // ww, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nw, n, c)
    attn, v = _scores(self, x)
    attn = attn + _position_bias(self)
    if sum(shift) > 0:
        attn = attn.view(b, nw, self.num_heads, n, n) + _shift_mask(self, x, ph, pw, shift).unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, self.num_heads, n, n)
    attn = F.dropout(attn.softmax(-1), p=self.attention_dropout, training=self.training)
    x = (attn @ v).transpose(1, 2).reshape(b * nw, n, self.num_heads * self.head_dim)
    x = F.dropout(self.proj(x), p=self.dropout, training=self.training)
    x = x.view(b, ph // wh, pw // ww, wh, ww, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, -1)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()
