"""`resnet20`, `resnet56`: CIFAR-style ResNets (He et al. 2016, §4.2) for 32x32 inputs.

Three stages of 16/32/64 channels with n basic blocks each (depth 6n+2). Downsampling
blocks use a 1x1 conv + BN projection shortcut (option B), which keeps every channel
coupling visible to torch-pruning's DependencyGraph (option A's zero padding is not).
"""

from __future__ import annotations

import torch
from torch import nn

from compress.models import ModelSpec, register
from compress.models.synthetic import synthetic_images


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10, width: int = 16):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("depth must be 6n+2")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if (i == 0 and stage > 0) else 1))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


for _depth in (20, 56):
    register(
        ModelSpec(
            name=f"resnet{_depth}",
            build=lambda d=_depth: CifarResNet(d),
            example_input=lambda b=1: torch.rand(b, 3, 32, 32),
            data=lambda: synthetic_images((3, 32, 32), 10),
            description=f"CIFAR-style ResNet-{_depth} (16/32/64 channels, 32x32 input, 10 classes; synthetic data)",
        )
    )
