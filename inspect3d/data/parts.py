"""Part masks (CAD slices of the build): where printed parts lie on a layer.

``ROOT/_parts/<layer file name>``, white (> 127) = part, the layer's own size. Fitting a
normal-only model and scoring with it both turn a mask into map cells the same way, here
(numpy and OpenCV only: the scoring path uses it).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from inspect3d.data.preprocess import read_image
from inspect3d.errors import InspectError

PARTS_DIR = "_parts"


def read_part_mask(path: str | Path, layer_size: tuple[int, int] | None = None) -> np.ndarray:
    """A part mask as bool (H, W); ``layer_size`` (height, width) must match when given."""
    mask = read_image(path, 1)
    if layer_size is not None and mask.shape[:2] != tuple(layer_size):
        h, w = layer_size
        raise InspectError(
            f"part mask {str(path)!r} is {mask.shape[1]}x{mask.shape[0]} but its layer is "
            f"{w}x{h}: part masks must have their layer's size"
        )
    return mask > 127


def part_cells(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Map cells (h, w) that a part touches, grown by one cell so its outline counts as part."""
    h, w = grid
    frac = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    return cv2.dilate((frac > 0).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0


def cells_from_masks(masks: list, grid: tuple[int, int]) -> np.ndarray:
    """Part cells (N, 1, h, w) float32 from part masks: bool/uint8 arrays at the layer's size
    or mask files; None where a layer has no mask (no part cell)."""
    cells = np.zeros((len(masks), 1, *grid), np.float32)
    for i, mask in enumerate(masks):
        if mask is not None:
            m = read_part_mask(mask) if isinstance(mask, str | Path) else np.asarray(mask) > 0
            cells[i, 0] = part_cells(m, grid)
    return cells
