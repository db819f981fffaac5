"""What an image file holds, judged from its first bytes, before anything decodes it.

OpenCV picks its decoder from the content, not from the name, so the pixel budget is judged the
same way: the magic bytes name the format, and for the formats a layer may come in (PNG, JPEG,
BMP, TIFF: ``IMAGE_EXTENSIONS``) the header gives width, height, channels and bytes per sample.
Content of any other kind (Radiance HDR, WebP, PNM, OpenEXR, JPEG 2000, GIF, ... which OpenCV
would decode too, or nothing known) is refused, and so is content whose kind does not match the
file's extension (an HDR file named ``.png``).

``ImageInfo.decoded_bytes`` is what one decode allocates at most: the decoded array at its own
depth and channels, plus the decoder's working buffers where they scale with the image
(a progressive JPEG's coefficients, a TIFF's largest tile or strip).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from inspect3d.data.layout import IMAGE_EXTENSIONS

# format -> file extensions it may carry
EXTENSIONS = {
    "PNG": (".png",),
    "JPEG": (".jpg", ".jpeg"),
    "BMP": (".bmp",),
    "TIFF": (".tif", ".tiff"),
}
# magic bytes of formats OpenCV (or its plugins) decodes that are never taken as layers
OTHER_FORMATS = (
    (b"#?RADIANCE", "Radiance HDR"),
    (b"#?RGBE", "Radiance HDR"),
    (b"\x76\x2f\x31\x01", "OpenEXR"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000 codestream"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"\x59\xa6\x6a\x95", "Sun raster"),
    (b"PF\n", "PFM"),
    (b"Pf\n", "PFM"),
)
HEAD_BYTES = 65536  # enough for every header read here (JPEG markers before the frame header)


class ImageRefused(ValueError):
    """The content is not an image the watcher takes; the message says what it is."""


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int
    channels: int  # as decoded (OpenCV turns palettes into BGR)
    sample_bytes: int  # bytes per channel as decoded (1, 2, 4, 8)
    work_bytes: int = 0  # decoder buffers that scale with the image

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def decoded_bytes(self) -> int:
        return self.pixels * self.channels * self.sample_bytes + self.work_bytes


def image_info(data: bytes, name: str) -> ImageInfo:
    """Format and size of the image in ``data`` (the file's first bytes at least), checked
    against the extension of ``name``; ``ImageRefused`` names what is wrong."""
    fmt = content_format(data)
    ext = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if fmt not in EXTENSIONS:
        raise ImageRefused(f"content is {fmt}, not a layer image ({', '.join(IMAGE_EXTENSIONS)})")
    if ext not in EXTENSIONS[fmt]:
        raise ImageRefused(
            f"content is {fmt} but the name says {ext or 'no extension'}: "
            f"name a {fmt} file {' or '.join(EXTENSIONS[fmt])}"
        )
    try:
        info = READERS[fmt](data)
    except (struct.error, IndexError, KeyError, ValueError) as exc:
        raise ImageRefused(f"{fmt} header is truncated or malformed ({exc})") from None
    if info.width <= 0 or info.height <= 0:
        raise ImageRefused(f"{fmt} header gives no size ({info.width}x{info.height})")
    return info


def content_format(data: bytes) -> str:
    """The format named by the magic bytes (``unknown content`` when none)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"BM"):
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if len(data) >= 2 and data[0:1] == b"P" and data[1:2] in b"1234567":
        return "PNM"
    for magic, fmt in OTHER_FORMATS:
        if data.startswith(magic):
            return fmt
    if data[4:8] == b"ftyp":
        return "ISO media (AVIF/HEIF)"
    return "unknown content" if data else "empty"


def _png(data: bytes) -> ImageInfo:
    if data[12:16] != b"IHDR":
        raise ValueError("no IHDR chunk first")
    w, h, depth, colour = struct.unpack(">IIBB", data[16:26])
    channels = {0: 1, 2: 3, 3: 3, 4: 4, 6: 4}[colour]  # grey+alpha counted as 4: an upper bound
    return ImageInfo("PNG", w, h, channels, 2 if depth == 16 else 1)


def _jpeg(data: bytes) -> ImageInfo:
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            raise ValueError(f"no marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            precision, h, w, comps = struct.unpack(">BHHB", data[i + 4 : i + 10])
            sample = 2 if precision > 8 else 1
            progressive = marker in (0xC2, 0xC6, 0xCA)
            # a progressive (or multi-scan) decode keeps every DCT coefficient: 2 bytes each
            work = w * h * comps * 2 if progressive else 0
            return ImageInfo("JPEG", w, h, 1 if comps == 1 else 3, sample, work)
        i += 2 + length
    raise ValueError("no frame header in the first bytes")


def _bmp(data: bytes) -> ImageInfo:
    header = struct.unpack("<I", data[14:18])[0]
    if header == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        w, h, _, bits = struct.unpack("<HHHH", data[18:26])
    else:
        w, h, _, bits = struct.unpack("<iiHH", data[18:30])
    return ImageInfo("BMP", abs(w), abs(h), 4 if bits == 32 else 3, 1)


TIFF_TYPES = {1: 1, 2: 1, 3: 2, 4: 4, 6: 1, 7: 1, 8: 2, 9: 4, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8}


def _tiff(data: bytes) -> ImageInfo:
    order = "<" if data[:2] == b"II" else ">"
    big = struct.unpack(order + "H", data[2:4])[0] == 43
    if big:
        (offset,) = struct.unpack(order + "Q", data[8:16])
        (n,) = struct.unpack(order + "Q", data[offset : offset + 8])
        start, size, fmt = offset + 8, 20, "HHQ"
    else:
        (offset,) = struct.unpack(order + "I", data[4:8])
        (n,) = struct.unpack(order + "H", data[offset : offset + 2])
        start, size, fmt = offset + 2, 12, "HHI"
    tags = {}
    for k in range(min(n, 4096)):
        entry = data[start + k * size : start + (k + 1) * size]
        tag, kind, count = struct.unpack(order + fmt, entry[: struct.calcsize(fmt)])
        value = entry[struct.calcsize(fmt) :]
        width = TIFF_TYPES.get(kind, 1)
        if count * width <= len(value):  # the value sits in the entry (first one is enough)
            code = {1: "B", 2: "B", 3: "H", 4: "I", 16: "Q"}.get(kind)
            tags[tag] = (
                struct.unpack(order + code, value[: struct.calcsize(code)])[0] if code else 0
            )
        elif tag == 258:  # BitsPerSample, one per channel, stored elsewhere: read the first
            (pointer,) = struct.unpack(order + ("Q" if big else "I"), value[: 8 if big else 4])
            tags[tag] = struct.unpack(order + "H", data[pointer : pointer + 2])[0]
    w, h = tags[256], tags[257]
    channels = max(1, tags.get(277, 1))
    sample = max(1, -(-tags.get(258, 8) // 8))
    # libtiff decodes a tile (or a strip) at a time into a buffer of its own
    tile = tags.get(322, 0) * tags.get(323, 0) or w * min(tags.get(278, h), h)
    return ImageInfo("TIFF", w, h, channels, sample, tile * channels * sample)


READERS = {"PNG": _png, "JPEG": _jpeg, "BMP": _bmp, "TIFF": _tiff}
