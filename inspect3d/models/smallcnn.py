"""The default network: a small, fast, fully convolutional CNN (output stride 16).

It sees the layer at full input resolution (512 px by default): a first stride-2 convolution
keeps 1-3 px streaks visible, which a 224 px thumbnail would lose.
"""

from __future__ import annotations

from torch import nn


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Sequential):
    """Stem + three stride-2 stages of two 3x3 convolutions; ``out_channels`` features."""

    def __init__(self, in_chans: int = 1, width: int = 16) -> None:
        w = [width, 2 * width, 4 * width, 8 * width]
        layers = [conv_bn(in_chans, w[0], stride=2)]
        for cin, cout in zip(w[:-1], w[1:], strict=True):
            layers += [conv_bn(cin, cout, stride=2), conv_bn(cout, cout)]
        super().__init__(*layers)
        self.out_channels = w[-1]
