"""Checking and scoring a batch of arrived layer files; each file gives a ``LayerResult``.

Every refusal names the bad value: a name that cannot be a layer (see ``inbox.Arrival``), a
wrong extension, a symlink out of the inbox, something that is not a regular file (a FIFO is
never opened for reading in a way that could block), zero bytes, content that is not the image
its name says, an image above the pixel or memory budget (judged from the content's header,
before any decoding), an unreadable or undecodable file. A file that may still be being written
(empty, cut short, undecodable) is handed back as 'retry' up to ``incomplete_tries`` times.
16-bit and colour images are converted the way the model's preprocessing converts arrays, and
that is noted on the layer.

Memory: a decode thread holds the file's bytes (at most ``max_image_bytes``) and, while it
converts, the decoded array (at most ``max_image_bytes``: pixels x channels x bytes per sample,
see ``imageinfo``) and 1.5 times that in converted copies, so decoding needs at most
``DECODE_THREADS x 3.5 x max_image_bytes`` (``decode_memory_bound``: 4 x 3.5 x 48 MB = 672 MB
at the defaults) on top of the model.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import stat
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inspect3d.data.layout import IMAGE_EXTENSIONS
from inspect3d.data.parts import PARTS_DIR
from inspect3d.data.preprocess import decode_image
from inspect3d.errors import InspectError
from inspect3d.infer.model import LayerScore, OnnxModel
from inspect3d.watch.imageinfo import ImageRefused, image_info
from inspect3d.watch.inbox import Arrival, inside

log = logging.getLogger(__name__)

DECODE_THREADS = min(4, os.cpu_count() or 1)


@functools.cache
def _pool() -> ThreadPoolExecutor:
    """One decode pool for the process's life, not threads started for every batch."""
    return ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="watch-decode")


@functools.cache
def _scorer() -> ThreadPoolExecutor:
    """One scoring thread for the process's life: batches are scored in order, one at a time,
    while the caller records the batch before."""
    return ThreadPoolExecutor(1, thread_name_prefix="watch-score")


@dataclass(frozen=True)
class Limits:
    """What a layer file may cost: pixels, bytes decoded (and bytes of the file itself)."""

    max_pixels: int
    max_image_bytes: int
    incomplete_tries: int = 3


DECODE_COPIES = 3.5  # file bytes + decoded array + 1.5x in conversions, per decode thread


def decode_memory_bound(limits: Limits, threads: int = DECODE_THREADS) -> int:
    """Bytes that decoding a batch may hold at once at most (see the module doc)."""
    return int(threads * DECODE_COPIES * limits.max_image_bytes)


@dataclass
class LayerResult:
    """The outcome for one file: ``status`` is 'scored', 'failed' or 'retry' (may still be
    being written: ``error`` says why it looks incomplete)."""

    arrival: Arrival
    status: str
    sha256: str | None = None
    score: LayerScore | None = None
    error: str | None = None
    note: str | None = None


class Incomplete(Exception):
    """The file looks cut short: it may still be being written."""


def read_bytes(path: Path, limit: int) -> bytes:
    """The bytes of the regular file ``path`` (at most ``limit``), never blocking.

    ``O_NONBLOCK``: opening a FIFO returns at once instead of waiting for a writer; then only a
    regular file (``fstat``, on the opened file: no swap between check and read) is read. One
    place, so that tests can inject unreadability when run as root.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(f"is {_kind(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise ValueError(f"file of {st.st_size} bytes is above max_image_bytes={limit}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit + 1)
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
    ):  # fmt: skip
        if test(mode):
            return name
    return "not a regular file"


def check_file(a: Arrival, inbox: Path, limits: Limits) -> tuple[str | None, bytes | None]:
    """(error, bytes): the reason to refuse the file, or its content. ``Incomplete`` when the
    file may still be being written."""
    if a.problem is not None:
        return a.problem, None
    if a.path.suffix.lower() not in IMAGE_EXTENSIONS:
        return (
            f"extension {a.path.suffix!r} of {a.rel!r} is not an image: "
            f"use one of {', '.join(IMAGE_EXTENSIONS)}",
            None,
        )
    if a.path.is_symlink() and not inside(a.path, inbox):
        return f"{a.rel!r} is a symlink pointing out of the inbox; copy the file in instead", None
    try:
        data = read_bytes(a.path, limits.max_image_bytes)
    except OSError as exc:
        return f"cannot read {a.rel!r}: {exc.strerror or exc}", None
    except ValueError as exc:
        return f"{a.rel!r}: {exc}", None
    if not data:
        raise Incomplete(f"{a.rel!r} has 0 bytes: an empty or truncated image")
    return _check_content(a, data, limits), data


def _check_content(a: Arrival, data: bytes, limits: Limits) -> str | None:
    try:
        info = image_info(data, a.path.name)
    except ImageRefused as exc:
        if "truncated" in str(exc) or len(data) < 64:
            raise Incomplete(f"{a.rel!r}: {exc}") from None
        return f"{a.rel!r}: {exc}"
    if info.pixels > limits.max_pixels:
        return (
            f"{a.rel!r} is {info.width}x{info.height} pixels, above max_pixels={limits.max_pixels}"
        )
    if info.decoded_bytes > limits.max_image_bytes:
        return (
            f"{a.rel!r} ({info.format} {info.width}x{info.height}, {info.channels} channel(s) of "
            f"{info.sample_bytes} byte(s)) needs {info.decoded_bytes} bytes to decode, above "
            f"max_image_bytes={limits.max_image_bytes}"
        )
    return None


def decode(
    data: bytes, channels: int, rel: str, target: tuple[int, int] | None = None
) -> tuple[np.ndarray | None, str | None]:
    """(image as the preprocessing expects it, note on conversions) or (None, error)."""
    try:
        image, notes = decode_image(data, channels, repr(rel), target)
    except InspectError as exc:
        return None, str(exc)
    return image, "; ".join(notes) or None


Prepared = tuple[LayerResult, np.ndarray | None]


def prepare_batch(
    model: OnnxModel, arrivals: list[Arrival], inbox: Path, limits: Limits
) -> list[Future[Prepared]]:
    """Start reading, hashing, checking and decoding ``arrivals`` on the decode threads.

    OpenCV and hashlib release the GIL, so layers landing together from many printers use all
    cores, and the next batch decodes while the current one is scored and recorded.
    """
    return [_pool().submit(_prepare, model, a, inbox, limits) for a in arrivals]


def start_batch(
    model: OnnxModel, arrivals: list[Arrival], inbox: Path, limits: Limits
) -> list[Future]:
    """Start a batch: its files read, checked and decoded on the decode threads, then scored on
    the scoring thread. The last future gives the batch's results (``score_prepared``); the
    others are its files' (to cancel them with it)."""
    prepared = prepare_batch(model, arrivals, inbox, limits)
    return [*prepared, _scorer().submit(score_prepared, model, prepared)]


def score_prepared(model: OnnxModel, prepared: list[Future[Prepared]]) -> list[LayerResult]:
    """Wait for the prepared files and score the decoded ones in one inference call."""
    results, images = [], []
    for result, image in (f.result() for f in prepared):
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
    model: OnnxModel, a: Arrival, inbox: Path, limits: Limits
) -> tuple[LayerResult, np.ndarray | None]:
    try:
        return _prepare_file(model, a, inbox, limits)
    except Incomplete as exc:
        if a.tries + 1 >= limits.incomplete_tries:
            why = f"{exc} (still so after {a.tries + 1} tries: gave up)"
            return LayerResult(a, "failed", error=why), None
        return LayerResult(a, "retry", error=str(exc)), None
    except Exception as exc:  # anything unexpected stays with this one file
        log.exception("checking %r failed", a.rel)
        return LayerResult(a, "failed", error=f"{a.rel!r}: {type(exc).__name__}: {exc}"), None


def _prepare_file(
    model: OnnxModel, a: Arrival, inbox: Path, limits: Limits
) -> tuple[LayerResult, np.ndarray | None]:
    error, data = check_file(a, inbox, limits)
    sha = hashlib.sha256(data).hexdigest() if data is not None else None
    if error is None and data is not None and len(data) != a.size:
        raise Incomplete(
            f"{a.rel!r} changed after it looked stable ({a.size} -> {len(data)} bytes)"
        )
    if error is not None:
        return LayerResult(a, "failed", sha, error=error), None
    pre = model.meta.preprocess
    image, note = decode(data, pre.channels, a.rel, pre.size)
    del data
    if image is None:
        raise Incomplete(note)
    if image.shape[0] * image.shape[1] > limits.max_pixels:
        msg = (
            f"{a.rel!r} is {image.shape[1]}x{image.shape[0]} pixels, "
            f"above max_pixels={limits.max_pixels}"
        )
        return LayerResult(a, "failed", sha, error=msg), None
    return LayerResult(a, "failed", sha, error="not scored", note=note), pre(image)


def _predict_one(model: OnnxModel, result: LayerResult, x: np.ndarray) -> LayerScore | None:
    try:
        return model.score_inputs(x[None])[0]
    except Exception as exc:  # recorded on the layer; the watcher goes on
        result.error = f"{result.arrival.rel!r}: the model cannot score it: {exc}"
        return None
