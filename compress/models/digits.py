"""`digits-resnet`: a small residual CNN on scikit-learn's bundled 8x8 digits (ships offline)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from compress.models import ModelSpec, register


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and an identity shortcut."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + x)


class DigitsResNet(nn.Module):
    """stem conv 1->C + BN + ReLU, `blocks` basic blocks, global average pool, linear C->10."""

    def __init__(self, channels: int = 32, blocks: int = 2, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())
        self.layers = nn.Sequential(*[BasicBlock(channels) for _ in range(blocks)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def digits_datasets(seed: int = 0, test_size: float = 0.25):
    """scikit-learn digits scaled to [0, 1], stratified split with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = data.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_size, stratify=y, random_state=seed)
    ds = torch.utils.data.TensorDataset
    return ds(torch.from_numpy(xtr), torch.from_numpy(ytr)), ds(torch.from_numpy(xte), torch.from_numpy(yte))


register(
    ModelSpec(
        name="digits-resnet",
        build=DigitsResNet,
        example_input=lambda b=1: torch.rand(b, 1, 8, 8),
        data=digits_datasets,
        description="residual CNN (stem + 2 basic blocks, 32 channels) on scikit-learn digits, 8x8, 10 classes",
    )
)
