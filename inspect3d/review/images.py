"""Pictures for people: layer thumbnails (plain, or with the defect map on top) and the record.

Thumbnails are small JPEGs as ``data:`` URIs so a report page is one self-contained file that
opens offline and can be mailed or attached to a part's record. Defect maps are drawn with the
product's one colour scale (``inspect3d.infer.overlay``): threshold in the middle of the bar,
and a model's region of interest outlined by its one ``draw_roi``.
"""

from __future__ import annotations

import base64
from pathlib import Path

import cv2
import numpy as np

from inspect3d.data.preprocess import read_image, resize
from inspect3d.infer.overlay import (
    INK,
    PAPER,
    colourise,
    draw_roi,
    evidence_image,
    legend,
    roi_points,
    text_width,
    title_bar,
)
from inspect3d.io import write_bytes_atomic

THUMB_SIDE = 240
VIEW_SIDE = 240
FONT, SMALL = cv2.FONT_HERSHEY_SIMPLEX, 0.36


def thumbnail(
    image: Path,
    defect_map: np.ndarray | None = None,
    map_threshold: float | None = None,
    title: list[str] | None = None,
    side: int = THUMB_SIDE,
    roi=None,
) -> str | None:
    """A ``data:image/jpeg`` URI of the layer, None if unreadable.

    With ``defect_map`` (and its ``map_threshold``) the map is overlaid, with ``title`` above
    and the colour bar below, and the model's ``roi`` outlined; without, the plain layer.
    """
    try:
        grey = read_image(image, channels=1)
    except (OSError, ValueError):
        return None
    scale = side / max(grey.shape)
    grey = resize(grey, max(1, round(grey.shape[0] * scale)), max(1, round(grey.shape[1] * scale)))
    if defect_map is None or map_threshold is None:
        return jpeg_uri(grey)
    return jpeg_uri(evidence_image(grey, defect_map, map_threshold, title or [image.name], roi))


def image_size(image: Path | None) -> tuple[int, int] | None:
    """(height, width) in pixels of a layer image, None if it cannot be read."""
    if image is None:
        return None
    try:
        return read_image(image, channels=1).shape[:2]
    except (OSError, ValueError):
        return None


def jpeg_uri(img: np.ndarray, quality: int = 85) -> str:
    ok, data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("could not encode a thumbnail")
    return "data:image/jpeg;base64," + base64.b64encode(data.tobytes()).decode("ascii")


def map_stack(maps: list[np.ndarray | None]) -> np.ndarray:
    """Per-layer defect maps as one (layers, h, w) float16 array; unscored layers are NaN."""
    shape = next((m.shape for m in maps if m is not None), (1, 1))
    blank = np.full(shape, np.nan, dtype=np.float32)
    return np.stack([blank if m is None or m.shape != shape else m for m in maps]).astype(
        np.float16
    )


def projections(
    stack: np.ndarray,
    map_threshold: float,
    layers: list[int],
    size_px: tuple[int, int] | None = None,
    roi=None,
) -> dict[str, np.ndarray]:
    """Side (layers x width: max over rows) and top (height x width: max over layers) views.

    Each is titled, has axes (layer numbers; x and y in pixels of the layer image when
    ``size_px`` = (height, width) is known, else in map cells) and the colour bar. The side
    view has the first layer at the bottom, like the part on the build plate. The top view
    (the layer's own x and y) has the model's ``roi`` outlined.
    """
    s = np.nan_to_num(stack.astype(np.float32), nan=0.0)
    h, w = s.shape[1:]
    unit = "px" if size_px else "map cells"
    px_h, px_w = size_px or (h, w)
    x_ticks = _ticks(w, px_w)
    side = Axes(
        "Side view: max over y, per layer", f"x ({unit})", "layer",
        x_ticks, [(len(layers) - 1 - i, str(n)) for i, n in _spread(layers)],
    )  # fmt: skip
    top = Axes("Top view: max over all layers", f"x ({unit})", f"y ({unit})",
               x_ticks, _ticks(h, px_h), roi)  # fmt: skip
    return {
        "side": side.draw(s.max(axis=1)[::-1], map_threshold),
        "top": top.draw(s.max(axis=0), map_threshold),
    }


def _spread(layers: list[int], n: int = 6) -> list[tuple[int, int]]:
    """Up to ``n`` (index, layer number) pairs spread over ``layers``, first and last included."""
    if not layers:
        return []
    idx = sorted({round(i * (len(layers) - 1) / max(1, n - 1)) for i in range(n)})
    return [(i, layers[i]) for i in idx]


def _ticks(cells: int, pixels: int) -> list[tuple[float, str]]:
    """Ticks at the start, middle and end of an axis of ``cells`` map cells (labels in px)."""
    return [(f * cells - 0.5, f"{round(f * pixels)}") for f in (0.0, 0.5, 1.0)]


class Axes:
    """A heat map of map cells drawn as square-ish blocks, with title, ticks and labels."""

    LEFT, BOTTOM, TOP, RIGHT = 46, 34, 24, 12

    def __init__(self, title, xlabel, ylabel, xticks, yticks, roi=None) -> None:
        self.title, self.xlabel, self.ylabel = title, xlabel, ylabel
        self.xticks, self.yticks = xticks, yticks  # (cell position, label)
        self.roi = roi  # polygon in fractions of the plotted area, outlined; None: none

    def draw(self, values: np.ndarray, map_threshold: float) -> np.ndarray:
        rows, cols = values.shape
        cx, cy = max(2, VIEW_SIDE // cols), max(2, VIEW_SIDE // rows)
        heat = colourise(values, map_threshold)  # no smoothing: these are the model's cells
        heat = cv2.resize(heat, (cols * cx, rows * cy), interpolation=cv2.INTER_NEAREST)
        width = max(self.LEFT + heat.shape[1] + self.RIGHT, 260)
        canvas = np.full((self.TOP + heat.shape[0] + self.BOTTOM, width, 3), PAPER, np.uint8)
        x0, y0 = self.LEFT, self.TOP
        canvas[y0 : y0 + heat.shape[0], x0 : x0 + heat.shape[1]] = heat
        draw_roi(canvas, self.roi, (x0, y0, heat.shape[1], heat.shape[0]))
        cv2.rectangle(canvas, (x0 - 1, y0 - 1), (x0 + heat.shape[1], y0 + heat.shape[0]), INK, 1)
        self._labels(canvas, (x0, y0), heat.shape[:2], (cx, cy))
        key = legend(width, map_threshold, roi=roi_points(self.roi) is not None)
        return np.vstack([title_bar(width, [self.title]), canvas, key])

    def _labels(self, img, origin, shape, cell) -> None:
        (x0, y0), (hh, ww), (cx, cy) = origin, shape, cell
        for pos, label in self.xticks:
            x = int(np.clip(x0 + (pos + 0.5) * cx, x0, x0 + ww))
            cv2.line(img, (x, y0 + hh), (x, y0 + hh + 4), INK, 1)
            left = int(np.clip(x - text_width(label, SMALL) / 2, 0, img.shape[1] - 30))
            _put(img, label, (left, y0 + hh + 15))
        _put(img, self.xlabel, (x0 + ww // 2 - text_width(self.xlabel, SMALL) // 2, y0 + hh + 29))
        for pos, label in self.yticks:
            y = int(np.clip(y0 + (pos + 0.5) * cy, y0, y0 + hh))
            cv2.line(img, (x0 - 5, y), (x0 - 1, y), INK, 1)
            _put(img, label, (x0 - 7 - text_width(label, SMALL), y + 4))
        _put(img, self.ylabel, (2, y0 - 8))


def _put(img: np.ndarray, text: str, org: tuple[int, int]) -> None:
    cv2.putText(img, text, org, FONT, SMALL, INK, 1, cv2.LINE_AA)


def write_record(
    folder: Path,
    layers: list[int],
    maps: list[np.ndarray | None],
    map_threshold: float,
    size_px: tuple[int, int] | None = None,
    roi=None,
) -> list[Path]:
    """The part's layer record: ``defect_maps.npy``, ``layers.txt`` and ``side.png``/``top.png``
    (the top view with the model's ``roi`` outlined)."""
    stack = map_stack(maps)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "defect_maps.npy", "wb") as f:
        np.save(f, stack)
    out = [folder / "defect_maps.npy"]
    out.append(
        write_bytes_atomic(folder / "layers.txt", "".join(f"{n}\n" for n in layers).encode())
    )
    for name, img in projections(stack, map_threshold, layers, size_px, roi).items():
        ok, png = cv2.imencode(".png", img)
        if ok:
            out.append(write_bytes_atomic(folder / f"{name}.png", png.tobytes()))
    return out
