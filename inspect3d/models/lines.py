"""Line features: how strongly a thin, long line runs through each cell of the class map.

A recoater streak is 1-3 px wide and a few grey levels deep, far below what a stride-8 CNN
feature resolves against powder texture, but it is long and straight along (or across) the
recoating direction. ``LineFeatures`` makes that the evidence, with fixed operators (no
weights, so a frozen probe gets them for free and they export to ONNX as plain tensor ops):

1. ridge response per pixel, per direction: a pixel brighter (or darker) than *both* of its
   neighbours ``offset`` px away across the line; a step edge (a part's outline, the plate's
   border) is brighter than one neighbour only and gives nothing. In units of the layer's
   own spread of that response (capped at ``CLIP``), so exposure and contrast do not move it.
2. mean along the line over ``segment`` px, then the *smallest* of ``segments`` such means
   end to end (with the same sign): a streak holds along its whole length, while a short edge,
   a part's straight side or a grain dragged a few px lights one segment only.
3. the strongest line of each ``stride`` x ``stride`` cell, for vertical and horizontal lines
   and each offset: ``channels`` = 2 x len(offsets) maps at the backbone's grid.

Measured (2026-12-06, one-off scripts, not in the repository): on 12 synthetic jobs (seed 2,
512 px, both printers; N = 19 streak and 115 good layers) the layer maximum of step 3 alone
separates streak from good layers completely (lowest streak layer 0.96, highest good one 0.37),
where a plain mean over the same 128 px does not (part sides and short dragged grains then score
as high: layer AUROC 0.40-0.68); on PBLM (1024 px photos shrunk to 512, 20 per class) scratch
layers score a median 1.40 and 1.30 against 0.36 and 0.41 for the two classes without scratches
(PBLM's classes are also sessions: see shared/datasets/README.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

OFFSETS = (2, 4)  # px across the line: 2 suits 1-3 px lines, 4 up to 7 px
SEGMENT = 16  # px along the line per mean
SEGMENTS = 8  # a line must hold over SEGMENTS x SEGMENT px (128 px by default)
CLIP = 3.0  # per-pixel response capped at 3 spreads: a short, strong rim cannot fill a segment


class LineFeatures(nn.Module):
    """Normalised pixels (N, C, H, W) -> line strength (N, channels, ceil(H/s), ceil(W/s))."""

    def __init__(
        self,
        stride: int = 8,
        offsets: tuple[int, ...] = OFFSETS,
        segment: int = SEGMENT,
        segments: int = SEGMENTS,
    ) -> None:
        super().__init__()
        self.stride = stride
        self.offsets = tuple(int(d) for d in offsets)
        self.segment = int(segment) | 1  # odd: centred on the pixel
        self.segments = int(segments)
        self.channels = 2 * len(self.offsets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grey = x.float().mean(dim=1, keepdim=True)
        maps = [self._lines(grey, d, vertical) for vertical in (True, False) for d in self.offsets]
        strength = torch.cat(maps, dim=1)
        return F.max_pool2d(strength, self.stride, self.stride, ceil_mode=True)

    def _lines(self, grey: torch.Tensor, offset: int, vertical: bool) -> torch.Tensor:
        across = 3 if vertical else 2  # the neighbours of a vertical line are left and right
        ridge = _ridge(grey, offset, across)
        spread = ridge.flatten(1).std(dim=1).view(-1, 1, 1, 1) + 1e-3
        return self._holds((ridge / spread).clamp(-CLIP, CLIP), vertical)

    def _holds(self, ridge: torch.Tensor, vertical: bool) -> torch.Tensor:
        """Smallest of ``segments`` means end to end along the line, keeping one sign."""
        k, half = self.segment, self.segment // 2
        kernel, pad = ((k, 1), (half, 0)) if vertical else ((1, k), (0, half))
        mean = F.avg_pool2d(ridge, kernel, stride=1, padding=pad, count_include_pad=False)
        reach = (self.segments - 1) * k // 2  # centre of the outermost segment
        along = 2 if vertical else 3
        padded = F.pad(mean, (0, 0, reach, reach) if vertical else (reach, reach, 0, 0))
        n = mean.shape[along]
        last = max(self.segments - 1, 1)
        starts = [round(i * 2 * reach / last) for i in range(self.segments)]
        segs = torch.stack([padded.narrow(along, start, n) for start in starts])
        bright = segs.amin(dim=0).clamp(min=0)
        dark = (-segs).amin(dim=0).clamp(min=0)
        return torch.maximum(bright, dark)


def _ridge(grey: torch.Tensor, offset: int, dim: int) -> torch.Tensor:
    """Signed ridge response: >0 where a pixel is brighter than both neighbours ``offset`` px
    away along ``dim``, <0 where darker than both, 0 otherwise (edges, flat powder)."""
    n = grey.shape[dim]
    pad = (offset, offset, 0, 0) if dim == 3 else (0, 0, offset, offset)
    padded = F.pad(grey, pad, mode="replicate")
    before = padded.narrow(dim, 0, n)
    after = padded.narrow(dim, 2 * offset, n)
    bright = torch.minimum(grey - before, grey - after).clamp(min=0)
    dark = torch.minimum(before - grey, after - grey).clamp(min=0)
    return bright - dark


class WithLines(nn.Module):
    """A stride-``stride`` backbone's features with ``LineFeatures`` appended on its grid."""

    def __init__(self, backbone: nn.Module, channels: int, stride: int = 8) -> None:
        super().__init__()
        self.backbone = backbone
        self.lines = LineFeatures(stride)
        self.out_channels = channels + self.lines.channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)
        lines = self.lines(x)
        h, w = feats.shape[-2:]
        return torch.cat([feats, lines[..., :h, :w]], dim=1)
