"""ViTs whose heads and MLP neurons are groups.

`vit-tiny`: ViT-Ti/16 (Touvron et al. 2021 sizes: dim 192, 12 blocks, 3 heads, MLP 768), 224x224,
synthetic data (shapes and cost only). `digits-vit`: a small ViT on scikit-learn's 8x8 digits, the
transformer that trains to a meaningful accuracy offline in under a minute on one CPU thread.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.models import ModelSpec, register
from compress.models.digits import digits_datasets
from compress.models.synthetic import synthetic_images
from compress.models.transformer import EncoderBlock


class ViT(nn.Module):
    """Pre-LN ViT with a class token.

    `patch_kernel` > `patch` makes the patch embedding overlap its neighbours (stride `patch`,
    padding keeps image // patch tokens per side): on 8x8 digits a 4x4 kernel at stride 2 lifted
    held-out accuracy from 93-96% to 96-98% (3 seeds), the cheapest inductive bias a ViT this
    small can get. None keeps the standard non-overlapping embedding.
    """

    def __init__(
        self,
        image: int = 224,
        patch: int = 16,
        dim: int = 192,
        depth: int = 12,
        heads: int = 3,
        mlp: int = 768,
        num_classes: int = 1000,
        channels: int = 3,
        patch_kernel: int | None = None,
    ):
        super().__init__()
        k = patch_kernel or patch
        if k < patch or (k - patch) % 2:
            raise ValueError(f"patch_kernel {k} must be patch ({patch}) plus an even number")
        self.patch_embed = nn.Conv2d(channels, dim, k, patch, padding=(k - patch) // 2)
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


def digits_vit() -> ViT:
    """8x8 digits, 4x4 patch kernel at stride 2 → 16 tokens + cls; dim 64, 3 blocks x 4 heads (16 dims), MLP 128."""
    return ViT(image=8, patch=2, patch_kernel=4, dim=64, depth=3, heads=4, mlp=128, num_classes=10, channels=1)


register(
    ModelSpec(
        name="digits-vit",
        build=digits_vit,
        example_input=lambda b=1: torch.rand(b, 1, 8, 8),
        data=digits_datasets,
        description="small ViT (dim 64, 3 blocks x 4 heads, MLP 128, 16 tokens + cls) on scikit-learn digits, "
        "8x8, 10 classes",
    )
)
