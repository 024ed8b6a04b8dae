"""One configurable ResNet covering the ResNet-A/B/C/D variants of "Bag of Tricks" (He et al., 2019, Fig. 2).

    variant  stride-2 in path A     stem                               downsampling shortcut
    a        first 1x1 conv (v1)    7x7/2 conv, 64                     1x1/2 conv + BN
    b        3x3 conv               7x7/2 conv, 64                     1x1/2 conv + BN
    c        3x3 conv               three 3x3 convs 32-32-64, first /2  1x1/2 conv + BN
    d        3x3 conv               three 3x3 convs 32-32-64, first /2  2x2/2 avg-pool, 1x1/1 conv + BN

ResNet-10/18/34 use the basic block, whose only stride sits in its first 3x3 conv, so for them "a" and "b"
are the same network. Inside the stages, names follow torchvision (``layer1.0.conv1``, ``bn3``,
``downsample``, ``fc``); the stem, 7x7 or deep, is one ``stem`` module.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

VARIANTS = ("a", "b", "c", "d")


@dataclass(frozen=True)
class VariantSpec:
    """What a paper variant changes, as three switches."""

    stride_in_3x3: bool  # ResNet-B: the stride-2 moves from the first 1x1 conv to the 3x3 conv
    deep_stem: bool  # ResNet-C: 7x7 stem -> three 3x3 convs
    avg_down: bool  # ResNet-D: shortcut = 2x2 avg-pool (stride 2) + 1x1 conv (stride 1)

    @classmethod
    def of(cls, variant: str) -> VariantSpec:
        if variant not in VARIANTS:
            raise ValueError(f"unknown ResNet variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        return cls(stride_in_3x3=variant != "a", deep_stem=variant in "cd", avg_down=variant == "d")


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-10/18/34). The stride always sits in the first one."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int, downsample: nn.Module | None, spec: VariantSpec):
        super().__init__()
        self.conv1 = conv3x3(cin, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (ResNet-50/101/152). ResNet-A strides in conv1, B/C/D in conv2."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, downsample: nn.Module | None, spec: VariantSpec):
        super().__init__()
        stride_1x1, stride_3x3 = (1, stride) if spec.stride_in_3x3 else (stride, 1)
        self.conv1 = conv1x1(cin, width, stride_1x1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride_3x3)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


def make_downsample(cin: int, cout: int, stride: int, spec: VariantSpec) -> nn.Sequential:
    """The projection shortcut of a block that changes resolution or width."""
    if spec.avg_down:
        # ResNet-D: average first, so the 1x1 conv sees every input position instead of a quarter of them.
        # ceil_mode/count_include_pad match GluonCV and timm (identical on even feature maps).
        pool = nn.AvgPool2d(2, stride=stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
        layers = OrderedDict(pool=pool, conv=conv1x1(cin, cout), bn=nn.BatchNorm2d(cout))
    else:
        layers = OrderedDict(conv=conv1x1(cin, cout, stride), bn=nn.BatchNorm2d(cout))
    return nn.Sequential(layers)


def make_stem(spec: VariantSpec, width: int = 64, deep_width: int = 32) -> nn.Sequential:
    """Input stem up to (and including) the 3x3/2 max-pool: 224 px in, 56 px out."""
    if spec.deep_stem:
        # ResNet-C: three 3x3 convs cost about as much as one 7x7 but add depth and non-linearity.
        layers = OrderedDict(
            conv1=conv3x3(3, deep_width, stride=2),
            bn1=nn.BatchNorm2d(deep_width),
            relu1=nn.ReLU(inplace=True),
            conv2=conv3x3(deep_width, deep_width),
            bn2=nn.BatchNorm2d(deep_width),
            relu2=nn.ReLU(inplace=True),
            conv3=conv3x3(deep_width, width),
            bn3=nn.BatchNorm2d(width),
            relu3=nn.ReLU(inplace=True),
        )
    else:
        layers = OrderedDict(
            conv1=nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False),
            bn1=nn.BatchNorm2d(width),
            relu1=nn.ReLU(inplace=True),
        )
    layers["pool"] = nn.MaxPool2d(3, stride=2, padding=1)
    return nn.Sequential(layers)


class ResNet(nn.Module):
    """ResNet for ImageNet-style inputs; ``variant`` selects the paper's A/B/C/D tweaks.

    Args:
        block: BasicBlock or Bottleneck.
        layers: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
        variant: "a" | "b" | "c" | "d" (see the module docstring).
        num_classes: width of the final fully connected layer.
        zero_init_last: "zero gamma": the last BN of every residual block starts with gamma = 0, so each
            block starts as the identity (paper section 3.1).
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: tuple[int, int, int, int],
        variant: str = "d",
        num_classes: int = 1000,
        zero_init_last: bool = True,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.variant = variant
        spec = VariantSpec.of(variant)
        self.stem = make_stem(spec)
        cin = 64
        for i, (num_blocks, width) in enumerate(zip(layers, (64, 128, 256, 512), strict=True)):
            stride = 1 if i == 0 else 2
            cout = width * block.expansion
            blocks = []
            for j in range(num_blocks):
                s = stride if j == 0 else 1
                down = make_downsample(cin, cout, s, spec) if (s != 1 or cin != cout) else None
                blocks.append(block(cin, width, s, down, spec))
                cin = cout
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_features = cin
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.reset_parameters(zero_init_last)

    def reset_parameters(self, zero_init_last: bool = True) -> None:
        """torchvision's initialisation, plus zero gamma on each block's last BN when asked."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                m.reset_parameters()
        if zero_init_last:
            for bn in self.last_bns():
                nn.init.zeros_(bn.weight)

    def blocks(self) -> list[BasicBlock | Bottleneck]:
        return [m for m in self.modules() if isinstance(m, BasicBlock | Bottleneck)]

    def last_bns(self) -> list[nn.BatchNorm2d]:
        """The BN that closes each residual branch (the one zero gamma applies to)."""
        return [b.last_bn for b in self.blocks()]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.forward_features(x)).flatten(1)
        return self.fc(x)
