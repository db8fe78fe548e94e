"""CIFAR-style networks: He et al.'s ResNets (6n+2 layers), CRD's resnet8x4/32x4, WideResNets.

Shapes follow the CRD benchmark (Tian et al. 2020) so results are comparable with the KD
literature: 3x3 stem, three (or four for the x4 variants' widths) stages, global average pool.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from pipeline.models import register_model


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """depth = 6n + 2; `widths` are the stem and three stage widths."""

    def __init__(self, depth: int, widths: tuple[int, ...], num_classes: int, in_channels: int):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, in_planes = [], widths[0]
        for i, planes in enumerate(widths[1:]):
            for j in range(n):
                layers.append(BasicBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class WideBlock(nn.Module):
    """Pre-activation block of Zagoruyko & Komodakis (2016)."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = F.relu(self.bn2(y))
        if self.dropout:
            y = F.dropout(y, self.dropout, self.training)
        y = self.conv2(y)
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-depth-width: depth = 6n + 4, stage widths 16·k, 32·k, 64·k."""

    def __init__(
        self, depth: int, width: int, num_classes: int, in_channels: int, dropout: float = 0.0
    ):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        layers, in_planes = [], widths[0]
        for i, planes in enumerate(widths[1:]):
            for j in range(n):
                layers.append(WideBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1, dropout))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def _resnet(depth: int, widths: tuple[int, ...]):
    def factory(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
        return CifarResNet(depth, widths, num_classes, input_shape[0])

    return factory


def _wrn(depth: int, width: int):
    def factory(num_classes: int, input_shape: tuple[int, ...], dropout: float = 0.0) -> nn.Module:
        return WideResNet(depth, width, num_classes, input_shape[0], dropout)

    return factory


def _register(name: str, factory, doc: str) -> None:
    factory.__name__ = name
    factory.__doc__ = doc
    register_model(factory)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register(
        f"resnet{_depth}",
        _resnet(_depth, (16, 16, 32, 64)),
        f"CIFAR ResNet-{_depth} (He et al. 2016), widths 16/32/64.",
    )
for _depth in (8, 32):
    _register(
        f"resnet{_depth}x4",
        _resnet(_depth, (32, 64, 128, 256)),
        f"ResNet-{_depth}x4 as in the CRD benchmark, widths 64/128/256.",
    )
for _depth, _width in ((16, 1), (16, 2), (16, 4), (40, 1), (40, 2), (28, 10)):
    _register(
        f"wrn_{_depth}_{_width}",
        _wrn(_depth, _width),
        f"WideResNet-{_depth}-{_width} (Zagoruyko & Komodakis 2016).",
    )
