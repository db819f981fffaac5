"""Defect-map overlay: the layer in grey with the defect map as a heat map on top (PNG)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from inspect3d.data.preprocess import read_image, resize
from inspect3d.io import write_bytes_atomic


def overlay(layer_grey: np.ndarray, defect_map: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """BGR image: ``layer_grey`` (H, W) blended with the up-sampled defect map (h, w) in [0, 1]."""
    h, w = layer_grey.shape[:2]
    heat = cv2.resize(defect_map.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    colored = cv2.applyColorMap(np.clip(heat * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    base = cv2.cvtColor(layer_grey, cv2.COLOR_GRAY2BGR)
    weight = (alpha * heat)[..., None]  # clean regions stay plain grey
    return (base * (1 - weight) + colored * weight).astype(np.uint8)


def write_overlay(
    image_path: str | Path, defect_map: np.ndarray, out_dir: str | Path, max_side: int = 1024
) -> Path:
    """Write ``<out_dir>/<image stem>.overlay.png`` for a layer image file; return its path."""
    grey = read_image(image_path, channels=1)
    scale = min(1.0, max_side / max(grey.shape))
    grey = resize(grey, round(grey.shape[0] * scale), round(grey.shape[1] * scale))
    ok, png = cv2.imencode(".png", overlay(grey, defect_map))
    if not ok:
        raise RuntimeError(f"could not encode the overlay of {image_path}")
    return write_bytes_atomic(Path(out_dir) / f"{Path(image_path).stem}.overlay.png", png.tobytes())
