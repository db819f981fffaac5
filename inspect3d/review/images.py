"""Pictures for people: layer thumbnails with the defect map on top, and the build record.

Thumbnails are small JPEGs as ``data:`` URIs so a report page is one self-contained file that
opens offline and can be mailed or attached to a part's record.
"""

from __future__ import annotations

import base64
from pathlib import Path

import cv2
import numpy as np

from inspect3d.data.preprocess import read_image, resize
from inspect3d.infer.overlay import overlay
from inspect3d.io import write_bytes_atomic

THUMB_SIDE = 240


def thumbnail(image: Path, defect_map: np.ndarray | None, side: int = THUMB_SIDE) -> str | None:
    """A ``data:image/jpeg`` URI of the layer (overlaid with ``defect_map``), None if unreadable."""
    try:
        grey = read_image(image, channels=1)
    except (OSError, ValueError):
        return None
    scale = side / max(grey.shape)
    grey = resize(grey, max(1, round(grey.shape[0] * scale)), max(1, round(grey.shape[1] * scale)))
    img = overlay(grey, defect_map) if defect_map is not None else grey
    return jpeg_uri(img)


def jpeg_uri(img: np.ndarray, quality: int = 82) -> str:
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


def projections(stack: np.ndarray, side: int = 240) -> dict[str, np.ndarray]:
    """Side (layers x width: max over rows) and top (height x width: max over layers) views.

    The side view has the first layer at the bottom, like the part on the build plate.
    """
    s = np.nan_to_num(stack.astype(np.float32), nan=0.0)
    views = {"side": s.max(axis=1)[::-1], "top": s.max(axis=0)}
    return {name: _heat(v, side) for name, v in views.items()}


def _heat(values: np.ndarray, side: int) -> np.ndarray:
    """Each map cell as a square block (no smoothing: these are the model's own cells)."""
    cell = max(2, side // max(values.shape))
    v = np.clip(values * 255, 0, 255).astype(np.uint8)
    big = cv2.resize(v, (v.shape[1] * cell, v.shape[0] * cell), interpolation=cv2.INTER_NEAREST)
    return cv2.applyColorMap(big, cv2.COLORMAP_JET)


def write_record(folder: Path, layers: list[int], maps: list[np.ndarray | None]) -> list[Path]:
    """The part's layer record: ``defect_maps.npy``, ``layers.txt`` and ``side.png``/``top.png``."""
    stack = map_stack(maps)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "defect_maps.npy", "wb") as f:
        np.save(f, stack)
    out = [folder / "defect_maps.npy"]
    out.append(
        write_bytes_atomic(folder / "layers.txt", "".join(f"{n}\n" for n in layers).encode())
    )
    for name, img in projections(stack).items():
        ok, png = cv2.imencode(".png", img)
        if ok:
            out.append(write_bytes_atomic(folder / f"{name}.png", png.tobytes()))
    return out
