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
            raise InspectError(f"channels={self.channels!r} is not valid: use 1 (grey) or 3 (colour)")
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

    def load(self, path: str | Path) -> np.ndarray:
        """Read a layer image file and return model input: uint8 array (C, H, W)."""
        return self(read_image(path, self.channels))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Decoded image (H, W) or (H, W, C), uint8 (RGB for colour) -> uint8 (C, H, W)."""
        image = _to_channels(_to_uint8(image), self.channels)
        image = resize(image, self.height, self.width)
        if image.ndim == 2:
            return image[None]
        return np.ascontiguousarray(image.transpose(2, 0, 1))


def read_image(path: str | Path, channels: int) -> np.ndarray:
    """Decode an image file as grey (H, W) or RGB (H, W, 3) uint8; clear errors for bad files.

    Reads through ``np.fromfile`` so paths with spaces or non-ASCII characters work everywhere.
    """
    path = Path(path)
    if not path.is_file():
        raise InspectError(f"layer image not found: {str(path)!r}")
    image, _ = decode_image(np.fromfile(str(path), dtype=np.uint8), channels, repr(str(path)))
    return image


def decode_image(
    data: bytes | np.ndarray, channels: int, source: str = "image"
) -> tuple[np.ndarray, list[str]]:
    """Encoded bytes -> grey (H, W) or RGB (H, W, 3) uint8, and notes on what was converted.

    Any depth (16-bit is scaled to 8) and any colour layout are accepted; EXIF orientation is
    applied. ``source`` names the input in the error for undecodable data.
    """
    buf = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data
    image = cv2.imdecode(buf, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR) if buf.size else None
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
