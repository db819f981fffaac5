"""The default network: a small, fast, fully convolutional residual CNN (output stride 16).

It sees the layer at full input resolution (384-512 px by default): a first stride-2
convolution keeps 1-3 px streaks visible, which a 224 px thumbnail would lose.
"""

from __future__ import annotations

import torch
from torch import nn

from inspect3d.errors import InspectError


def conv_bn(cin: int, cout: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class Block(nn.Module):
    """Two 3x3 convolutions with a shortcut (stride-2 blocks halve the resolution)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, stride), conv_bn(cout, cout, relu=False))
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
            if (cin, stride) != (cout, 1)
            else nn.Identity()
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.short(x))


STRIDES = (8, 16)


class SmallCNN(nn.Sequential):
    """Stem + three residual stages; ``out_channels`` features at ``stride`` 16 (every stage
    halves the resolution) or 8 (the last stage keeps it: a finer defect map, where a 1-3 px
    streak fills more of its cells, for about 1.75x the compute)."""

    def __init__(self, in_chans: int = 1, width: int = 16, stride: int = 16) -> None:
        if stride not in STRIDES:
            raise InspectError(f"model.stride={stride!r} is not valid for smallcnn: use 8 or 16")
        w = [width, 2 * width, 4 * width, 8 * width]
        strides = [2, 2, 2 if stride == 16 else 1]
        layers: list[nn.Module] = [conv_bn(in_chans, w[0], stride=2)]
        layers += [Block(cin, cout, s) for cin, cout, s in zip(w[:-1], w[1:], strides, strict=True)]
        super().__init__(*layers)
        self.out_channels = w[-1]
