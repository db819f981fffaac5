"""Frozen patch features: EfficientNet-Lite0 (offline ImageNet weights) at strides 8 and 16.

The stride-16 map is upsampled to the stride-8 grid and concatenated (40 + 112 = 152
channels); a 3x3 mean over neighbouring cells gives each patch a little context (as
PatchCore does). ``grid_stride=16`` averages 2x2 cells, a coarser and cheaper map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inspect3d.data.preprocess import Preprocess
from inspect3d.errors import InspectError
from inspect3d.models.efficientnet_lite import (
    FINE_CHANNELS,
    STRIDE16_BLOCK,
    efficientnet_lite0,
    fine_features,
    lite_input_for,
)
from inspect3d.models.layernet import Normalize

GRID_STRIDES = (8, 16)
FEATURE_CHANNELS = FINE_CHANNELS


class PatchFeatures(nn.Module):
    """uint8 layers (N, C, H, W) -> patch features (N, 152, H/s, W/s), s = ``grid_stride``."""

    def __init__(self, pre: Preprocess, pretrained: bool = True, grid_stride: int = 8) -> None:
        super().__init__()
        if grid_stride not in GRID_STRIDES:
            raise InspectError(
                f"normal.grid_stride={grid_stride!r} is not valid: use one of {GRID_STRIDES}"
            )
        lite = efficientnet_lite0(pretrained)
        self.normalize = Normalize(pre)
        self.adapter = lite_input_for(pre.norm, pre.mean, pre.std)
        self.stem = lite.stem
        self.blocks = nn.ModuleList(lite.blocks[: STRIDE16_BLOCK + 1])
        self.grid_stride = grid_stride
        self.out_channels = FEATURE_CHANNELS
        self.requires_grad_(False)
        self.eval()

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the feature map for an input of ``height`` x ``width`` ("same" padding:
        each stride-2 stage rounds up; the stride-16 grid averages 2x2 cells, rounding down)."""
        h, w = -(-height // 8), -(-width // 8)
        return (h // 2, w // 2) if self.grid_stride == 16 else (h, w)

    def train(self, mode: bool = True) -> PatchFeatures:
        return super().train(False)  # frozen: BatchNorm always uses the ImageNet statistics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = fine_features(self.stem, self.blocks, self.adapter(self.normalize(x)))
        return F.avg_pool2d(feats, 2) if self.grid_stride == 16 else feats
