"""The region of interest of a normal-only model: the build plate, not the machine around it.

``normal.roi`` is a rectangle ``[x0, y0, x1, y1]`` or a polygon ``[[x, y], ...]`` (at least 3
points), in pixels of the layer or in fractions of it (all values within [0, 1]); or ``auto``,
which finds the plate from the good layers themselves. Whatever the form, the model stores a
polygon in fractions of the layer, so it holds at any input size; the map is 0 outside it.

``auto``: a static camera sees the machine frame identically on every layer, while the powder
is spread anew at each recoat, so its fine texture changes from layer to layer. The frame is
where the high-pass texture of consecutive good layers correlates; the plate is the largest
connected region where it does not, and its convex hull (which also closes the holes that
parts persisting over a few layers leave) is the ROI.
"""

from __future__ import annotations

import logging
from typing import Any

import cv2
import numpy as np

from inspect3d.errors import InspectError

log = logging.getLogger(__name__)
AUTO_GRID = 256  # px: auto finds the plate on the layers shrunk to this long side
STATIC_CORRELATION = 0.5  # texture this alike in consecutive layers is machine, not powder
MIN_STATIC_SHARE = 0.03  # less static area than this: nothing to exclude
MIN_PLATE_SHARE = 0.25  # a plate smaller than this share of the layer is not believed


def parse_roi(spec: Any, width: int, height: int) -> list[list[float]] | None:
    """``normal.roi`` as a polygon in fractions of a ``width`` x ``height`` layer; None = all."""
    if spec is None or (isinstance(spec, str) and spec.lower() in ("none", "full", "")):
        return None
    points = _points(spec)
    pts = np.asarray(points, dtype=float)
    fractions = bool((pts >= 0).all() and (pts <= 1).all())
    scale = np.array([1.0, 1.0]) if fractions else np.array([width, height], dtype=float)
    frac = pts / scale
    if (frac < -1e-9).any() or (frac > 1 + 1e-9).any():
        raise InspectError(
            f"normal.roi={_show(spec)} lies outside the {width}x{height} layer: give pixels "
            f"within 0..{width} (x) and 0..{height} (y), or fractions in [0, 1]"
        )
    poly = np.clip(frac, 0.0, 1.0)
    if cv2.contourArea(poly.astype(np.float32)) <= 0:
        raise InspectError(f"normal.roi={_show(spec)} encloses no area: give a plate region")
    return poly.round(6).tolist()


def _points(spec: Any) -> list[list[float]]:
    try:
        values = [
            list(p) if isinstance(p, list | tuple) or hasattr(p, "__len__") else p
            for p in list(spec)
        ]
    except TypeError as exc:
        raise InspectError(f"normal.roi={_show(spec)} is not valid: {_ROI_FORMS}") from exc
    if all(isinstance(v, int | float) for v in values) and len(values) == 4:
        x0, y0, x1, y1 = (float(v) for v in values)
        if x1 <= x0 or y1 <= y0:
            raise InspectError(
                f"normal.roi={_show(spec)} is not a rectangle: need x0 < x1 and y0 < y1"
            )
        return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
    if not all(isinstance(v, list) and len(v) == 2 for v in values):
        raise InspectError(f"normal.roi={_show(spec)} is not valid: {_ROI_FORMS}")
    if len(values) < 3:
        raise InspectError(
            f"normal.roi={_show(spec)} is a polygon of {len(values)} point(s): it needs at least 3"
        )
    return [[float(x), float(y)] for x, y in values]


_ROI_FORMS = (
    "use [x0, y0, x1, y1] (a rectangle), [[x, y], [x, y], [x, y], ...] (a polygon of 3 or "
    "more points), in pixels or fractions of the layer, or auto"
)


def _show(spec: Any) -> str:
    return repr(spec if isinstance(spec, str | int | float) else _plain(spec))


def _plain(spec: Any) -> Any:
    if isinstance(spec, str | int | float) or spec is None:
        return spec
    try:
        return [_plain(v) for v in spec]
    except TypeError:
        return spec


def roi_on_grid(poly: list[list[float]], grid: tuple[int, int]) -> np.ndarray:
    """The polygon (fractions) as a 0/1 mask on a (h, w) grid of map cells (cell centres)."""
    h, w = grid
    mask = np.zeros((h * 8, w * 8), np.uint8)  # 8x supersampled, then cells by area
    pts = (np.asarray(poly) * [w * 8, h * 8]).round().astype(np.int32)
    cv2.fillPoly(mask, [pts], 1)
    cells = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    out = (cells >= 0.5).astype(np.float32)
    if not out.any():
        raise InspectError(
            f"normal.roi polygon {poly} covers no cell of the {w}x{h} defect map: make it larger"
        )
    return out


def roi_mask(poly: list[list[float]] | None, height: int, width: int) -> np.ndarray:
    """The polygon as a uint8 mask (255 inside) at a layer's own size; all 255 for None."""
    if poly is None:
        return np.full((height, width), 255, np.uint8)
    mask = np.zeros((height, width), np.uint8)
    pts = (np.asarray(poly) * [width, height]).round().astype(np.int32)
    cv2.fillPoly(mask, [pts], 255)
    return mask


def auto_roi(images: np.ndarray) -> list[list[float]] | None:
    """The plate found in good layers (N, C, H, W) uint8, in data order; None (all of the
    layer) when the layers show no static surround to exclude."""
    if len(images) < 3:
        raise InspectError(
            f"normal.roi=auto needs at least 3 good layers to tell powder from frame, not "
            f"{len(images)}: give more layers or an explicit normal.roi"
        )
    static = _static_texture(images)
    plate = _largest_region(~static)
    if plate is None:
        log.info("normal.roi=auto: no static frame found; the whole layer is inspected")
        return None
    h, w = plate.shape
    plate = cv2.dilate(plate, np.ones((5, 5), np.uint8))  # back to the edge the 7x7 windows blur
    hull = cv2.convexHull(cv2.findNonZero(plate)).reshape(-1, 2).astype(float)
    poly = ((hull + 0.5) / [w, h]).clip(0, 1).round(6).tolist()
    log.info("normal.roi=auto: the plate covers %.0f%% of the layer", 100 * plate.mean())
    return poly


def _static_texture(images: np.ndarray) -> np.ndarray:
    """Where the fine texture repeats from one layer to the next (correlation of the
    high-pass image of consecutive layers over 7x7 windows above ``STATIC_CORRELATION``),
    on a grid of at most ``AUTO_GRID`` px."""
    grey = images.mean(axis=1).astype(np.float32)  # (N, H, W)
    scale = min(1.0, AUTO_GRID / max(grey.shape[1:]))
    size = (max(16, round(grey.shape[2] * scale)), max(16, round(grey.shape[1] * scale)))
    highs = []
    for g in grey:
        small = cv2.resize(g, size, interpolation=cv2.INTER_AREA)
        highs.append(small - cv2.GaussianBlur(small, (0, 0), 1.5))
    corr = np.zeros(highs[0].shape, np.float32)
    for a, b in zip(highs[:-1], highs[1:], strict=True):
        num = cv2.boxFilter(a * b, -1, (7, 7))
        den = np.sqrt(cv2.boxFilter(a * a, -1, (7, 7)) * cv2.boxFilter(b * b, -1, (7, 7)))
        corr += num / (den + 1e-6)
    return corr / (len(highs) - 1) > STATIC_CORRELATION


def _largest_region(plate: np.ndarray) -> np.ndarray | None:
    """The largest connected region of ``plate`` (uint8 0/1), if it is a plausible plate
    with something static around it; else None."""
    if (~plate).mean() < MIN_STATIC_SHARE:
        return None
    u8 = cv2.morphologyEx(plate.astype(np.uint8), cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(u8, connectivity=8)
    if n < 2:
        return None
    big = 1 + int(stats[1:, cv2.CC_STAT_AREA].argmax())
    region = (labels == big).astype(np.uint8)
    if region.mean() < MIN_PLATE_SHARE:
        log.warning(
            "normal.roi=auto: the changing region covers only %.0f%% of the layer, too little "
            "for a build plate; inspecting the whole layer (give normal.roi to choose)",
            100 * region.mean(),
        )
        return None
    return region
