"""`mobilenetv2`: MobileNetV2 (Sandler et al. 2018), 224x224, 1000 classes, width 1.0.

Inverted residual blocks: 1x1 expand conv + BN + ReLU6, 3x3 depthwise conv + BN +
ReLU6, 1x1 linear projection + BN, identity shortcut when shapes allow. An expanded
channel's group spans expand row, its depthwise filter and both BNs; projection
channels are coupled through the shortcut adds of their stage.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.models import ModelSpec, register
from compress.models.synthetic import synthetic_images


def _cbr(cin, cout, k=3, stride=1, groups=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU6()
    )


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [_cbr(cin, hidden, 1)]
        layers += [
            _cbr(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    # t (expansion), c (channels), n (repeats), s (first stride)
    CONFIG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000, last: int = 1280):
        super().__init__()
        feats, cin = [_cbr(3, 32, 3, 2)], 32
        for t, c, n, s in self.CONFIG:
            for i in range(n):
                feats.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        feats.append(_cbr(cin, last, 1))
        self.features = nn.Sequential(*feats)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x):
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.classifier(self.dropout(x))


register(
    ModelSpec(
        name="mobilenetv2",
        build=MobileNetV2,
        example_input=lambda b=1: torch.rand(b, 3, 224, 224),
        data=lambda: synthetic_images((3, 224, 224), 1000, train=64, test=32),
        description="MobileNetV2 1.0 (depthwise + inverted residual, 224x224, 1000 classes; synthetic data)",
    )
)
