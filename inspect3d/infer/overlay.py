"""The product's one colour scale for defect maps, and the overlay pictures made with it.

A defect map is either in [0, 1] (supervised: 1 - P(normal), crossing the model threshold) or
in units of a calibrated threshold (normal-only: 1.0 = threshold, unbounded above). Both are
drawn the same way: colour position = value / (2 * map_threshold), clipped to 1, so the
threshold always sits in the middle of the colour bar. Below it the colours are cool (blue to
cyan), at it they jump to yellow, above it they run through orange to red: a glance tells
"over the threshold" without reading numbers, and order is kept up to twice the threshold.

Every overlay written for people (predict's ``--overlay-dir``, the watcher's review evidence,
the report's thumbnails) carries a title (layer name, score) and this colour bar with the
threshold marked. A model with a region of interest (``ModelMeta.roi``: a polygon in fractions
of the layer; its map is 0 outside) has the polygon's outline drawn on the layer in the one
hue the scale lacks (magenta), with an "inspected region" entry under the colour bar.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from inspect3d.data.preprocess import read_image, resize
from inspect3d.errors import InspectError
from inspect3d.io import write_bytes_atomic

# (position in 0..1, BGR): cool below the threshold (0.5), warm from it on
_ANCHORS = [
    (0.0, (110, 40, 20)),
    (0.4999, (230, 210, 60)),
    (0.5, (0, 220, 255)),
    (0.75, (0, 130, 255)),
    (1.0, (20, 20, 200)),
]
FONT = cv2.FONT_HERSHEY_SIMPLEX
INK, PAPER = (30, 30, 30), (255, 255, 255)
# BGR magenta: the one hue the scale (blue, cyan, yellow, orange, red) never uses, so the
# outline cannot be read as map values; it shows on grey powder and on white paper alike
ROI_COLOUR = (255, 0, 255)
ROI_LABEL = "inspected region"


def _lut() -> np.ndarray:
    pos = np.linspace(0.0, 1.0, 256)
    xs = [a for a, _ in _ANCHORS]
    return np.stack(
        [np.interp(pos, xs, [c[i] for _, c in _ANCHORS]) for i in range(3)], axis=1
    ).astype(np.uint8)


LUT = _lut()  # (256, 3) BGR


MIN_MAP_THRESHOLD = 1e-6  # a threshold of 0 (flag everything) still draws: all above it


def check_map_threshold(map_threshold: float) -> float:
    t = float(map_threshold)
    if not np.isfinite(t) or t < 0:
        raise InspectError(f"map_threshold={map_threshold!r} is not valid: use a number >= 0")
    return max(t, MIN_MAP_THRESHOLD)


def colour_position(values: np.ndarray, map_threshold: float) -> np.ndarray:
    """Where each map value sits on the colour bar (0..1): threshold at 0.5, 2x threshold at 1."""
    t = check_map_threshold(map_threshold)
    v = np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0)
    return np.clip(v / (2.0 * t), 0.0, 1.0)


def colourise(values: np.ndarray, map_threshold: float) -> np.ndarray:
    """BGR image (..., 3) of map values on the colour scale."""
    return LUT[np.round(colour_position(values, map_threshold) * 255).astype(np.uint8)]


def roi_points(roi) -> np.ndarray | None:
    """A region of interest as an (N, 2) float array of (x, y) fractions; None = whole layer."""
    if roi is None:
        return None
    try:
        pts = np.asarray(roi, dtype=np.float64)
    except (TypeError, ValueError):
        pts = np.empty((0,))
    if pts.ndim != 2 or pts.shape[0] < 3 or pts.shape[1] != 2 or not np.isfinite(pts).all():
        raise InspectError(
            f"roi={roi!r} is not valid: use a polygon [[x, y], ...] of 3+ points in fractions "
            "of the layer (0..1), or None for the whole layer"
        )
    return pts


def draw_roi(
    img: np.ndarray, roi, box: tuple[int, int, int, int] | None = None, colour=ROI_COLOUR
) -> np.ndarray:
    """Draw the outline of ``roi`` (fractions of the layer) on ``img`` in place; return ``img``.

    ``box`` = (x, y, width, height): where the layer sits in ``img`` (default: all of it).
    No ROI (None) draws nothing. The line is 1 px up to 512 px, thicker on larger pictures.
    """
    pts = roi_points(roi)
    if pts is None:
        return img
    x, y, w, h = box or (0, 0, img.shape[1], img.shape[0])
    xy = np.stack([x + pts[:, 0] * w, y + pts[:, 1] * h], axis=1)  # as the model's ROI mask
    xy = np.clip(np.round(xy), [x, y], [x + w - 1, y + h - 1]).astype(np.int32)
    thick = max(1, round(max(w, h) / 512))
    cv2.polylines(img, [xy.reshape(-1, 1, 2)], True, colour, thick, cv2.LINE_8)
    return img


def overlay(
    layer_grey: np.ndarray,
    defect_map: np.ndarray,
    map_threshold: float,
    alpha: float = 0.55,
    roi=None,
) -> np.ndarray:
    """BGR image: ``layer_grey`` (H, W) blended with the up-sampled defect map (h, w).

    Clean regions stay plain grey: the blend weight grows with the colour position. With a
    ``roi`` (polygon in fractions of the layer) its outline is drawn on top.
    """
    h, w = layer_grey.shape[:2]
    heat = cv2.resize(defect_map.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    pos = colour_position(heat, map_threshold)
    base = cv2.cvtColor(layer_grey, cv2.COLOR_GRAY2BGR).astype(np.float32)
    weight = (alpha * np.minimum(1.0, 2.0 * pos))[..., None]
    img = (base * (1 - weight) + colourise(heat, map_threshold) * weight).astype(np.uint8)
    return draw_roi(img, roi)


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _text(img: np.ndarray, text: str, org: tuple[int, int], scale: float, colour=INK) -> None:
    cv2.putText(img, text, org, FONT, scale, colour, 1, cv2.LINE_AA)


def text_width(text: str, scale: float) -> int:
    return cv2.getTextSize(text, FONT, scale, 1)[0][0]


def legend(width: int, map_threshold: float, scale: float = 0.38, roi: bool = False) -> np.ndarray:
    """The colour bar (BGR, ``width`` wide) with ticks 0, threshold (marked) and 2x threshold+;
    with ``roi`` an "inspected region" entry below it."""
    t = check_map_threshold(map_threshold)
    pad, bar_h = 8, 10
    height = bar_h + 34
    img = np.full((height, width, 3), PAPER, np.uint8)
    x0, x1 = pad, width - pad
    ramp = np.linspace(0.0, 2.0 * t, max(2, x1 - x0))[None, :].repeat(bar_h, axis=0)
    img[4 : 4 + bar_h, x0:x1] = colourise(ramp, t)
    cv2.rectangle(img, (x0, 4), (x1 - 1, 4 + bar_h), INK, 1)
    mid = (x0 + x1) // 2
    cv2.line(img, (mid, 1), (mid, 4 + bar_h + 3), INK, 2)  # the threshold mark
    ticks = [(x0, "0", 0.0), (mid, f"threshold {_fmt(t)}", 0.5), (x1, f"{_fmt(2 * t)}+", 1.0)]
    for x, label, anchor in ticks:
        tw = text_width(label, scale)
        left = int(np.clip(x - anchor * tw, 1, width - tw - 1))
        _text(img, label, (left, 4 + bar_h + 14), scale)
    _text(img, "defect map (threshold = middle)", (x0, height - 4), scale * 0.9, (90, 90, 90))
    return np.vstack([img, roi_key(width, scale * 0.9)]) if roi else img


def roi_key(width: int, scale: float = 0.34) -> np.ndarray:
    """The legend row of the ROI outline: a line sample on layer grey, then "inspected region"."""
    img = np.full((16, width, 3), PAPER, np.uint8)
    img[3:13, 8:32] = 128
    cv2.line(img, (8, 8), (31, 8), ROI_COLOUR, 2)
    cv2.rectangle(img, (8, 3), (31, 12), INK, 1)
    _text(img, ROI_LABEL, (38, 12), scale, (90, 90, 90))
    return img


def title_bar(width: int, lines: list[str], scale: float = 0.42) -> np.ndarray:
    """White strip with one text line per entry, cut to fit ``width``."""
    line_h = int(26 * scale + 8)
    img = np.full((line_h * len(lines) + 4, width, 3), PAPER, np.uint8)
    for i, line in enumerate(lines):
        while line and text_width(line, scale) > width - 8:
            line = line[:-2] + "~"
        _text(img, line, (4, line_h * (i + 1) - 2), scale)
    return img


def evidence_image(
    layer_grey: np.ndarray,
    defect_map: np.ndarray,
    map_threshold: float,
    title: list[str],
    roi=None,
) -> np.ndarray:
    """The overlay with its title (layer name, score) above and the colour bar below; a ``roi``
    is outlined on the layer and named in the legend."""
    body = overlay(layer_grey, defect_map, map_threshold, roi=roi)
    width = body.shape[1]
    key = roi_points(roi) is not None
    return np.vstack([title_bar(width, title), body, legend(width, map_threshold, roi=key)])


def score_title(name: str, score: float | None, threshold: float | None) -> list[str]:
    """The title lines of an overlay: the layer's name, then its score against the threshold."""
    if score is None:
        return [name]
    verdict = "" if threshold is None else (" DEFECT" if score >= threshold else " ok")
    over = "" if threshold is None else f" (threshold {_fmt(threshold)})"
    return [name, f"score {score:.3f}{over}{verdict}"]


def write_overlay(
    image_path: str | Path,
    defect_map: np.ndarray,
    out_dir: str | Path,
    map_threshold: float,
    title: list[str] | None = None,
    max_side: int = 1024,
    *,
    roi=None,
) -> Path:
    """Write ``<out_dir>/<image stem>.overlay.png`` for a layer image file; return its path.

    ``roi``: the model's region of interest (``ModelMeta.roi``), outlined; None = whole layer.
    """
    grey = read_image(image_path, channels=1)
    scale = min(1.0, max_side / max(grey.shape))
    grey = resize(grey, round(grey.shape[0] * scale), round(grey.shape[1] * scale))
    img = evidence_image(grey, defect_map, map_threshold, title or [Path(image_path).name], roi)
    ok, png = cv2.imencode(".png", img)
    if not ok:
        raise RuntimeError(f"could not encode the overlay of {image_path}")
    return write_bytes_atomic(Path(out_dir) / f"{Path(image_path).stem}.overlay.png", png.tobytes())


def write_score_overlay(score, out_dir: str | Path, max_side: int = 1024, roi=None) -> Path:
    """The overlay of a scored layer file (an ``infer.model.LayerScore`` with a path), with the
    model's ``roi`` (``OnnxModel.meta.roi``) outlined when it has one."""
    t = score.map_threshold if score.map_threshold is not None else score.threshold
    title = score_title(Path(score.path).name, score.defect_score, score.threshold)
    return write_overlay(score.path, score.defect_map, out_dir, t, title, max_side, roi=roi)
