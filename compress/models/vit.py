"""`vit-tiny`: ViT-Ti/16 (Touvron et al. 2021 sizes: dim 192, 12 blocks, 3 heads, MLP 768), 224x224."""
from __future__ import annotations

import torch
from torch import nn

from . import ModelSpec, register
from .synthetic import synthetic_images
from .transformer import EncoderBlock


class ViT(nn.Module):
    def __init__(self, image: int = 224, patch: int = 16, dim: int = 192, depth: int = 12, heads: int = 3,
                 mlp: int = 768, num_classes: int = 1000, channels: int = 3):
        super().__init__()
        self.patch_embed = nn.Conv2d(channels, dim, patch, patch)
        n = (image // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, mlp, pre_norm=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


register(
    ModelSpec(
        name="vit-tiny",
        build=ViT,
        example_input=lambda b=1: torch.rand(b, 3, 224, 224),
        data=lambda: synthetic_images((3, 224, 224), 1000, train=64, test=32),
        description="ViT-Tiny/16 (192 dim, 12 blocks x 3 heads, MLP 768, 224x224, 1000 classes; synthetic data)",
    )
)
