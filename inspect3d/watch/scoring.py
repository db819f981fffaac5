"""Checking and scoring a batch of arrived layer files; each file gives a ``LayerResult``.

Every refusal names the bad value: wrong extension, control characters in the name, a symlink
out of the inbox, zero bytes, an image above the pixel limit (read from the header, before any
decoding), an unreadable or undecodable file. 16-bit and colour images are converted the way
the model's preprocessing converts arrays, and that is noted on the layer.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inspect3d.data.layout import IMAGE_EXTENSIONS
from inspect3d.data.parts import PARTS_DIR
from inspect3d.data.preprocess import decode_image, image_size
from inspect3d.errors import InspectError
from inspect3d.infer.model import LayerScore, OnnxModel
from inspect3d.watch.inbox import Arrival, inside, odd_name

log = logging.getLogger(__name__)

DECODE_THREADS = min(4, os.cpu_count() or 1)


@functools.cache
def _pool() -> ThreadPoolExecutor:
    """One decode pool for the process's life, not threads started for every batch."""
    return ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="watch-decode")


@dataclass
class LayerResult:
    """The outcome for one file: ``status`` is 'scored', 'failed' or 'retry' (still changing)."""

    arrival: Arrival
    status: str
    sha256: str | None = None
    score: LayerScore | None = None
    error: str | None = None
    note: str | None = None


def read_bytes(path: Path) -> bytes:
    """The file's bytes (one place, so that tests can inject unreadability when run as root)."""
    with open(path, "rb") as f:
        return f.read()


def check_file(a: Arrival, inbox: Path, max_pixels: int) -> tuple[str | None, bytes | None]:
    """(error, bytes): the reason to refuse the file, or its content."""
    if (why := odd_name(a.rel)) is not None:
        return why, None
    if a.path.suffix.lower() not in IMAGE_EXTENSIONS:
        return (
            f"extension {a.path.suffix!r} of {a.rel!r} is not an image: "
            f"use one of {', '.join(IMAGE_EXTENSIONS)}",
            None,
        )
    if a.path.is_symlink() and not inside(a.path, inbox):
        return f"{a.rel!r} is a symlink pointing out of the inbox; copy the file in instead", None
    try:
        data = read_bytes(a.path)
    except OSError as exc:
        return f"cannot read {a.rel!r}: {exc.strerror or exc}", None
    if not data:
        return f"{a.rel!r} has 0 bytes: an empty or truncated image", data
    size = image_size(data)
    if size is not None and size[0] * size[1] > max_pixels:
        return f"{a.rel!r} is {size[0]}x{size[1]} pixels, above max_pixels={max_pixels}", data
    return None, data


def decode(
    data: bytes, channels: int, rel: str, target: tuple[int, int] | None = None
) -> tuple[np.ndarray | None, str | None]:
    """(image as the preprocessing expects it, note on conversions) or (None, error)."""
    try:
        image, notes = decode_image(data, channels, repr(rel), target)
    except InspectError as exc:
        return None, str(exc)
    return image, "; ".join(notes) or None


def score_batch(
    model: OnnxModel, arrivals: list[Arrival], inbox: Path, max_pixels: int
) -> list[LayerResult]:
    """Check, decode and score ``arrivals`` (one onnxruntime call for all good ones).

    Files are read, hashed and decoded on a few threads at once (OpenCV and hashlib release
    the GIL), so layers landing together from many printers use all cores before inference.
    """
    results, images = [], []
    prepared = list(_pool().map(lambda a: _prepare(model, a, inbox, max_pixels), arrivals))
    for result, image in prepared:
        results.append(result)
        if image is not None:
            images.append((result, image))
    if images:
        cells = part_cells_of(model, [r.arrival for r, _ in images])
        try:
            scores = model.score_inputs(np.stack([x for _, x in images]), None, cells)
        except Exception:  # one bad input must not sink the batch: score them one by one
            scores = [_predict_one(model, r, x) for r, x in images]
        for (result, _), score in zip(images, scores, strict=True):
            if score is not None:
                result.status, result.score, result.error = "scored", score, None
    return results


def part_cells_of(model: OnnxModel, arrivals: list[Arrival]) -> np.ndarray | None:
    """Part cells for a model fitted with part masks: ``<job folder>/_parts/<layer file name>``
    (the CAD slice of that layer) where it exists; a layer without one is scored as powder and
    parts alike. An unreadable mask is logged and left out."""
    if model.part_grid is None:
        return None
    masks = []
    for a in arrivals:
        path = a.path.parent / PARTS_DIR / a.path.name
        masks.append(path if path.is_file() else None)
    try:
        return model.cells_of(masks)
    except InspectError as exc:
        log.warning("part masks not used for this batch: %s", exc)
        return None


def _prepare(
    model: OnnxModel, a: Arrival, inbox: Path, max_pixels: int
) -> tuple[LayerResult, np.ndarray | None]:
    error, data = check_file(a, inbox, max_pixels)
    sha = hashlib.sha256(data).hexdigest() if data is not None else None
    if error is None and data is not None and len(data) != a.size:
        return LayerResult(a, "retry"), None  # changed after it looked stable
    if error is not None:
        return LayerResult(a, "failed", sha, error=error), None
    pre = model.meta.preprocess
    image, note = decode(data, pre.channels, a.rel, pre.size)
    if image is None:
        return LayerResult(a, "failed", sha, error=note), None
    if image.shape[0] * image.shape[1] > max_pixels:
        msg = (
            f"{a.rel!r} is {image.shape[1]}x{image.shape[0]} pixels, above max_pixels={max_pixels}"
        )
        return LayerResult(a, "failed", sha, error=msg), None
    return LayerResult(a, "failed", sha, error="not scored", note=note), pre(image)


def _predict_one(model: OnnxModel, result: LayerResult, x: np.ndarray) -> LayerScore | None:
    try:
        return model.score_inputs(x[None])[0]
    except Exception as exc:  # recorded on the layer; the watcher goes on
        result.error = f"{result.arrival.rel!r}: the model cannot score it: {exc}"
        return None
