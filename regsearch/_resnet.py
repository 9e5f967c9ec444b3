"""The ResNet family (He et al. 2015) laid out as torchvision and timm name it, so their state dicts load as they are.

Parameter and buffer names follow that layout (`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.downsample.0`, `fc`);
modules without state (activations, pooling, `drop_path`) are this project's own: each activation is its own
module, so a dropout site names one place in the network.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

STEMS = ("auto", "small", "imagenet")
SMALL_STEM_UP_TO = 64
"""`stem: auto` picks the small-image stem for images up to this many pixels on the shorter side."""


class DropPath(nn.Module):
    """Stochastic depth: in training, zeroes a whole residual branch per example with probability `drop_prob` and
    scales the kept ones by 1/(1 - drop_prob); the identity in eval mode (the `drop_path` plugin sets the rate)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob <= 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:g}"


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def _conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Sequential | None:
    """The projection shortcut (1x1 conv + BatchNorm) where the block changes shape, else none (identity)."""
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(_conv1x1(c_in, c_out, stride), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm on the residual branch (ResNet-18/34); the stride on the first."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.drop_path = DropPath()
        self.downsample = _shortcut(c_in, planes, stride)
        self.relu = nn.ReLU(inplace=True)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.drop_path(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (with the stride, as torchvision's "v1.5"), 1x1 expand by 4, BatchNorm after each (ResNet-50)."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = _conv1x1(c_in, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = _conv1x1(planes, out)
        self.bn3 = nn.BatchNorm2d(out)
        self.drop_path = DropPath()
        self.downsample = _shortcut(c_in, out, stride)
        self.relu = nn.ReLU(inplace=True)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
        out = self.drop_path(self.bn3(self.conv3(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Stem, `len(depth)` stages of residual blocks (width doubling, stride 2 from the second stage), global average
    pooling and a linear classifier `fc`: any image size goes in."""

    def __init__(self, block: type[BasicBlock | Bottleneck], depth: Sequence[int], num_classes: int,
                 in_channels: int = 3, width: int = 64, stem: str = "imagenet", zero_init_residual: bool = True
                 ) -> None:
        super().__init__()
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = _conv3x3(in_channels, width)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        c_in = width
        for i, blocks in enumerate(depth):
            planes = width * 2 ** i
            stage = []
            for j in range(blocks):
                stage.append(block(c_in, planes, 2 if i > 0 and j == 0 else 1))
                c_in = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.stages = len(depth)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # each block starts as the identity (Goyal et al. 2017): trains faster from scratch
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, self.stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(self.flatten(self.avgpool(x)))
