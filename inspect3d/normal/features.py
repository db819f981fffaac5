"""Frozen patch features: EfficientNet-Lite0 (offline ImageNet weights) at strides 8 and 16.

The stride-16 map is upsampled to the stride-8 grid and concatenated (40 + 112 = 152
channels); a 3x3 mean over neighbouring cells gives each patch a little context (as
PatchCore does). ``grid_stride=16`` averages 2x2 cells, a coarser and cheaper map.

``residual=True`` appends ``PixelResidual``'s 8 channels: what the layer's pixels show at
1-3 px scale (thin streaks, pits, spatter) that the stride-8 ImageNet features dilute.
"""

from __future__ import annotations

import math

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
RESIDUAL_CHANNELS = 8
LINE_PX = 63  # length a streak response is averaged over (along rows, along columns)


def gaussian_1d(sigma: float, reach: float = 3.0) -> torch.Tensor:
    """A normalised 1-D Gaussian over +-ceil(``reach`` sigma) (at least +-1) samples."""
    r = max(1, math.ceil(reach * sigma))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


class PixelResidual(nn.Module):
    """uint8 layers (N, C, H, W) -> (N, 8, ceil(H/8), ceil(W/8)): matched responses of the grey
    layer's high-pass residual (layer minus its Gaussian blur), each cell their maximum over its
    8x8 pixels, bright (+) and dark (-) apart:

    * a row and a column line: the residual (sigma 3 px) averaged over ``LINE_PX`` pixels along
      it, where a 1-3 px streak adds up and the powder's grain averages out;
    * a speck: the residual smoothed by 1 px (spatter);
    * a pit or spot: the sigma-8 residual smoothed by 3 px (holes, incandescence).

    Grey levels as they are (0-255): the memory bank scales them (``MemoryBank``).
    """

    def __init__(self) -> None:
        super().__init__()
        for name, sigma in (("g1", 1.0), ("g3", 3.0), ("g8", 8.0)):
            self.register_buffer(name, gaussian_1d(sigma), persistent=False)

    @staticmethod
    def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        r = len(g) // 2
        x = F.conv2d(F.pad(x, [r, r, 0, 0], mode="replicate"), g.view(1, 1, 1, -1))
        return F.conv2d(F.pad(x, [0, 0, r, r], mode="replicate"), g.view(1, 1, -1, 1))

    @staticmethod
    def _line(x: torch.Tensor, along_rows: bool) -> torch.Tensor:
        """Mean over ``LINE_PX`` pixels along rows (columns), of those inside the layer."""
        r = LINE_PX // 2
        if along_rows:
            return F.avg_pool2d(x, (1, LINE_PX), 1, (0, r), count_include_pad=False)
        return F.avg_pool2d(x, (LINE_PX, 1), 1, (r, 0), count_include_pad=False)

    def on_grid(self, x: torch.Tensor, grid_stride: int) -> torch.Tensor:
        """The responses on the patch grid of ``grid_stride`` (16: the max over 2x2 cells)."""
        res = self(x)
        return F.max_pool2d(res, 2) if grid_stride == 16 else res

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grey = x.float().mean(1, keepdim=True)
        fine = grey - self._blur(grey, self.g3)
        broad = grey - self._blur(grey, self.g8)
        resp = torch.cat(
            [
                self._line(fine, True),
                self._line(fine, False),
                self._blur(fine, self.g1),
                self._blur(broad, self.g3),
            ],
            dim=1,
        )
        return F.max_pool2d(torch.cat([resp, -resp], dim=1), 8, stride=8, ceil_mode=True)


class PatchFeatures(nn.Module):
    """uint8 layers (N, C, H, W) -> patch features (N, 152 [+ 8], H/s, W/s), s = ``grid_stride``;
    ``deep_channels`` of them from the backbone, the rest ``PixelResidual``'s."""

    def __init__(
        self, pre: Preprocess, pretrained: bool = True, grid_stride: int = 8, residual: bool = False
    ) -> None:
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
        self.deep_channels = FEATURE_CHANNELS
        self.residual = PixelResidual() if residual else None
        self.out_channels = FEATURE_CHANNELS + (RESIDUAL_CHANNELS if residual else 0)
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
        feats = F.avg_pool2d(feats, 2) if self.grid_stride == 16 else feats
        if self.residual is None:
            return feats
        res = self.residual.on_grid(x, self.grid_stride)
        return torch.cat([feats, res[..., : feats.shape[-2], : feats.shape[-1]]], dim=1)
