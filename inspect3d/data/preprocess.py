"""The single preprocessing of a layer image, shared by training, export checks and scoring.

Pixels go through two steps, each defined once:
1. here (numpy/OpenCV): decode, convert to the model's channels, resize to the input size, giving
   ``uint8`` arrays of shape (C, H, W);
2. inside the network (``inspect3d.models.Normalize``, exported into the ONNX graph): cast to
   float and normalise, per image or with fixed mean/std.
The numbers for step 2 travel with the model (checkpoint and ONNX metadata), so a scorer cannot
use other ones.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from inspect3d.data.layout import IMAGE_EXTENSIONS
from inspect3d.errors import InspectError

NORM_MODES = ("per_image", "fixed")


@dataclass(frozen=True)
class Preprocess:
    """How a layer image becomes model input. ``norm``, ``mean``, ``std`` are applied in-graph."""

    height: int = 512
    width: int = 512
    channels: int = 1
    norm: str = "per_image"
    mean: float = 0.5
    std: float = 0.25

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise InspectError(
                f"channels={self.channels!r} is not valid: use 1 (grey) or 3 (colour)"
            )
        if self.norm not in NORM_MODES:
            raise InspectError(f"norm={self.norm!r} is not valid: use one of {NORM_MODES}")
        if min(self.height, self.width) < 32:
            raise InspectError(
                f"input size {self.height}x{self.width} is too small: use at least 32x32 pixels"
            )
        if self.std <= 0:
            raise InspectError(f"std={self.std!r} must be > 0")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the model input."""
        return self.height, self.width

    def load(self, path: str | Path) -> np.ndarray:
        """Read a layer image file and return model input: uint8 array (C, H, W)."""
        return self(read_image(path, self.channels, self.size))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Decoded image (H, W) or (H, W, C), uint8 (RGB for colour) -> uint8 (C, H, W)."""
        image = _to_channels(_to_uint8(image), self.channels)
        image = resize(image, self.height, self.width)
        if image.ndim == 2:
            return image[None]
        return np.ascontiguousarray(image.transpose(2, 0, 1))


def read_image(
    path: str | Path, channels: int, target: tuple[int, int] | None = None
) -> np.ndarray:
    """Decode an image file as grey (H, W) or RGB (H, W, 3) uint8; clear errors for bad files.

    Reads through ``np.fromfile`` so paths with spaces or non-ASCII characters work everywhere.
    ``target`` (height, width): the size the image will be resized to (see ``decode_image``).
    """
    path = Path(path)
    if not path.is_file():
        raise InspectError(f"layer image not found: {str(path)!r}")
    data = np.fromfile(str(path), dtype=np.uint8)
    image, _ = decode_image(data, channels, repr(str(path)), target)
    return image


def decode_image(
    data: bytes | np.ndarray,
    channels: int,
    source: str = "image",
    target: tuple[int, int] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Encoded bytes -> grey (H, W) or RGB (H, W, 3) uint8, and notes on what was converted.

    Any depth (16-bit is scaled to 8) and any colour layout are accepted; EXIF orientation is
    applied. ``source`` names the input in the error for undecodable data. With ``target``
    (height, width), a JPEG at least twice as large in both directions is decoded at 1/2, 1/4
    or 1/8 scale (libjpeg's DCT scaling): up to ~10x less decode work, and never smaller than
    ``target``, so the final resize still shrinks (training and scoring both read files here).
    """
    buf = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data
    image = _decode(buf, jpeg_reduction(buf, target)) if buf.size else None
    if image is None:
        raise InspectError(
            f"cannot decode {source} ({buf.size} bytes): not a readable image; "
            f"expected one of {', '.join(IMAGE_EXTENSIONS)}"
        )
    notes = [f"{image.dtype} pixels scaled to 8 bit"] if image.dtype != np.uint8 else []
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if (image.ndim == 3) != (channels == 3):
        notes.append("colour converted to grey" if channels == 1 else "grey converted to colour")
    return _to_channels(_to_uint8(image), channels), notes


REDUCED_FLAGS = {  # factor -> (grey flag, colour flag)
    2: (cv2.IMREAD_REDUCED_GRAYSCALE_2, cv2.IMREAD_REDUCED_COLOR_2),
    4: (cv2.IMREAD_REDUCED_GRAYSCALE_4, cv2.IMREAD_REDUCED_COLOR_4),
    8: (cv2.IMREAD_REDUCED_GRAYSCALE_8, cv2.IMREAD_REDUCED_COLOR_8),
}


def jpeg_reduction(buf: np.ndarray, target: tuple[int, int] | None) -> tuple[int, int]:
    """(factor, colour components) for a reduced JPEG decode; factor 1 = decode in full."""
    header = jpeg_header(buf[:65536].tobytes()) if target is not None else None
    if header is None:
        return 1, 0
    (w, h), components = header
    factor = 1
    for f in (2, 4, 8):
        if -(-h // f) >= target[0] and -(-w // f) >= target[1]:
            factor = f
    return factor, components


def _decode(buf: np.ndarray, reduction: tuple[int, int]) -> np.ndarray | None:
    factor, components = reduction
    if factor == 1:
        return cv2.imdecode(buf, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    grey, colour = REDUCED_FLAGS[factor]
    return cv2.imdecode(buf, grey if components == 1 else colour)


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG or BMP header without decoding; None if unknown."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:2] == b"BM" and len(data) >= 26:
        w, h = struct.unpack("<ii", data[18:26])
        return abs(w), abs(h)
    header = jpeg_header(data)
    return None if header is None else header[0]


def jpeg_header(data: bytes) -> tuple[tuple[int, int], int] | None:
    """((width, height), colour components) from a JPEG's frame header; None if not a JPEG."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return (w, h), data[i + 9]
        i += 2 + length
    return None


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    shrinking = image.shape[0] >= height and image.shape[1] >= width
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interp)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return (image >> 8).astype(np.uint8)
    if np.issubdtype(image.dtype, np.floating):
        hi = 1.0 if float(image.max(initial=0.0)) <= 1.0 else 255.0
        return np.clip(image * (255.0 / hi), 0, 255).astype(np.uint8)
    raise InspectError(f"unsupported image dtype {image.dtype}: use uint8, uint16 or float")


def _to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise InspectError(
            f"image of shape {image.shape} is not a layer image: expected (H, W) or (H, W, 3)"
        )
    if channels == 1 and image.ndim == 3:
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if channels == 3 and image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    return image


COLOUR_SPREAD = 4.0  # mean (max - min) over R, G, B in grey levels above which an image is colour
CHANNEL_SAMPLE = 24  # images decoded (small) to tell grey layers from colour photos


def colour_spread(path: str | Path) -> float:
    """Mean over pixels of max(R, G, B) - min(R, G, B), from a small decode (0 for grey files;
    a grey scene saved as a colour JPEG stays within a level or two)."""
    image = resize(read_image(path, 3, (64, 64)), 64, 64).astype(np.int16)
    return float((image.max(2) - image.min(2)).mean())


def detect_channels(paths: list[str | Path]) -> tuple[int, int, int]:
    """(channels, colour images, images looked at): 3 when most of an even sample of the files
    are colour photos (their channels differ), else 1."""
    if not paths:
        return 1, 0, 0
    step = max(1, len(paths) // CHANNEL_SAMPLE)
    sample = list(paths)[::step][:CHANNEL_SAMPLE]
    colour = sum(colour_spread(p) > COLOUR_SPREAD for p in sample)
    return (3 if 2 * colour > len(sample) else 1), colour, len(sample)


def check_channels(model_channels: int, paths: list[str | Path], source: str) -> None:
    """A colour model given grey layers (or a grey model given colour photos) is an error."""
    found, colour, n = detect_channels(paths)
    if found == model_channels:
        return
    kinds = {1: "grey layers (data.channels=1)", 3: "colour layers (data.channels=3)"}
    raise InspectError(
        f"the model was trained on {kinds[model_channels]}, but {source} holds "
        f"{kinds[found].split(' (')[0]} ({colour} of {n} sampled images in colour): score it "
        f"on {kinds[model_channels].split(' (')[0]}, or train a model on these with "
        f"data.channels={found}; pass data.channels={model_channels} to convert them anyway"
    )
