"""ResNet-vd backbone (PResNet in the original code): a three-convolution stem, average-pool shortcuts on
the downsampling blocks, frozen BatchNorm. Module names follow the original so its checkpoints load as-is."""

from __future__ import annotations

import functools
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvNormLayer, FrozenBatchNorm2d


def _conv(ch_in, ch_out, kernel_size, stride=1, act=None):
    return ConvNormLayer(ch_in, ch_out, kernel_size, stride, act=act, norm=FrozenBatchNorm2d)


def _projection(ch_in: int, ch_out: int, stride: int) -> nn.Module:
    """The shortcut of a block whose input and output differ: a 1x1 conv, after a 2x2 average pool when the
    block downsamples (the "d" variant keeps all input pixels instead of a strided 1x1 conv)."""
    if stride == 1:
        return _conv(ch_in, ch_out, 1)
    return nn.Sequential(OrderedDict([("pool", nn.AvgPool2d(2, 2, 0, ceil_mode=True)), ("conv", _conv(ch_in, ch_out, 1))]))


class BasicBlock(nn.Module):
    def __init__(self, ch_in: int, ch_out: int, stride: int, projected: bool):
        super().__init__()
        self.branch2a = _conv(ch_in, ch_out, 3, stride, act="relu")
        self.branch2b = _conv(ch_out, ch_out, 3)
        self.short = _projection(ch_in, ch_out, stride) if projected else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch2b(self.branch2a(x))
        return F.relu(out + (x if self.short is None else self.short(x)))


class BottleNeck(nn.Module):
    def __init__(self, ch_in: int, ch_out: int, stride: int, projected: bool, stride_in_1x1: bool = False):
        super().__init__()
        width = ch_out // 4
        # The "b"/"d" variants (RT-DETRv2's) stride the 3x3; stride_in_1x1 strides the first 1x1 instead
        # (transformers' downsample_in_bottleneck).
        self.branch2a = _conv(ch_in, width, 1, stride if stride_in_1x1 else 1, act="relu")
        self.branch2b = _conv(width, width, 3, 1 if stride_in_1x1 else stride, act="relu")
        self.branch2c = _conv(width, ch_out, 1)
        self.short = _projection(ch_in, ch_out, stride) if projected else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch2c(self.branch2b(self.branch2a(x)))
        return F.relu(out + (x if self.short is None else self.short(x)))


class Stage(nn.Module):
    def __init__(self, block, ch_in: int, ch_out: int, depth: int, stride: int):
        super().__init__()
        # The first block always projects its shortcut, even at equal widths (ResNet-18/34's first stage).
        self.blocks = nn.ModuleList(
            block(ch_in if i == 0 else ch_out, ch_out, stride if i == 0 else 1, i == 0) for i in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class PResNet(nn.Module):
    """Returns the feature maps of the stages in `return_idx` (strides 4, 8, 16, 32 for stages 0..3)."""

    def __init__(self, block: str, depths, channels, stem_channels: int = 64, return_idx=(1, 2, 3),
                 stride_in_1x1: bool = False):
        super().__init__()
        half = stem_channels // 2
        self.conv1 = nn.Sequential(OrderedDict([
            ("conv1_1", _conv(3, half, 3, 2, act="relu")),
            ("conv1_2", _conv(half, half, 3, 1, act="relu")),
            ("conv1_3", _conv(half, stem_channels, 3, 1, act="relu")),
        ]))
        block_class = BasicBlock if block == "basic" else functools.partial(BottleNeck, stride_in_1x1=stride_in_1x1)
        ch_in = stem_channels
        self.res_layers = nn.ModuleList()
        for i, (depth, ch_out) in enumerate(zip(depths, channels)):
            self.res_layers.append(Stage(block_class, ch_in, ch_out, depth, stride=1 if i == 0 else 2))
            ch_in = ch_out
        self.return_idx = list(return_idx)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)
        outputs = []
        for i, stage in enumerate(self.res_layers):
            x = stage(x)
            if i in self.return_idx:
                outputs.append(x)
        return outputs
