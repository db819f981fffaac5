"""The single preprocessing: shapes, channels, dtypes, odd paths and bad files."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from inspect3d.data.preprocess import Preprocess, decode_image, image_size, jpeg_header, read_image
from inspect3d.errors import InspectError


def write(path, image) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return str(path)


def test_grey_and_colour_files_give_the_model_shape(tmp_path):
    grey = write(tmp_path / "a.png", np.full((300, 200), 90, np.uint8))
    colour = write(tmp_path / "b.jpg", np.full((100, 150, 3), (10, 200, 30), np.uint8))
    for channels in (1, 3):
        pre = Preprocess(height=64, width=96, channels=channels)
        for path in (grey, colour):
            out = pre.load(path)
            assert out.shape == (channels, 64, 96) and out.dtype == np.uint8


def test_colour_is_rgb_not_bgr(tmp_path):
    path = write(
        tmp_path / "red.png",
        np.dstack([np.zeros((40, 40), np.uint8)] * 2 + [np.full((40, 40), 255, np.uint8)]),
    )
    out = Preprocess(height=40, width=40, channels=3).load(path)
    assert out[0].mean() == 255 and out[2].mean() == 0  # OpenCV's BGR red -> R channel first


def test_path_with_spaces_and_unicode(tmp_path):
    path = write(
        tmp_path / "Powder Uneven_With_Scratch" / "converted_ 0001 é.png",
        np.full((50, 50), 7, np.uint8),
    )
    assert Preprocess(height=32, width=32).load(path).max() == 7


def test_sixteen_bit_and_float_arrays_become_uint8():
    pre = Preprocess(height=32, width=32)
    assert pre(np.full((64, 64), 65535, np.uint16)).max() == 255
    assert pre(np.full((64, 64), 1.0, np.float32)).max() == 255


def test_array_and_file_paths_agree(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (200, 160), dtype=np.uint8)
    path = write(tmp_path / "x.png", image)
    pre = Preprocess(height=64, width=64)
    np.testing.assert_array_equal(pre(image), pre.load(path))


def test_corrupt_missing_and_empty_files_name_the_file(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "empty.png").write_bytes(b"")
    pre = Preprocess(height=32, width=32)
    for name in ("bad.jpg", "empty.png", "missing.png"):
        with pytest.raises(InspectError, match=name):
            pre.load(tmp_path / name)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"channels": 2}, "channels=2"),
        ({"norm": "zscore"}, "norm='zscore'"),
        ({"height": 8}, "too small"),
        ({"std": 0}, "std=0"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(InspectError, match=message):
        Preprocess(**kwargs)


def test_read_image_rejects_a_text_file(tmp_path):
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(InspectError, match="not a readable image"):
        read_image(tmp_path / "notes.png", 1)


def test_metadata_round_trip():
    pre = Preprocess(height=100, width=120, channels=3, norm="fixed", mean=0.4, std=0.2)
    assert Preprocess.from_dict(pre.to_dict()) == pre


def powder(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A textured grey layer: JPEG-compressible like a powder bed, with a bright streak."""
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.normal(120, 25, (h, w)).clip(0, 255).astype(np.uint8), (5, 5), 0)
    image[:, w // 3 : w // 3 + max(2, w // 100)] = 230
    return image


def test_large_jpeg_is_decoded_reduced_and_matches_the_full_decode(tmp_path):
    data = np.fromfile(write(tmp_path / "big.jpg", powder(1024, 1024)), np.uint8)
    reduced, _ = decode_image(data, 1, "big.jpg", target=(128, 128))
    assert reduced.shape == (128, 128)  # 1/8 scale: 8x8 fewer pixels to decode
    pre = Preprocess(height=128, width=128)
    full = pre(decode_image(data, 1, "big.jpg")[0])
    diff = np.abs(pre(reduced).astype(int) - full)
    assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 8


def test_reduced_decode_never_goes_below_the_model_size(tmp_path):
    data = np.fromfile(write(tmp_path / "a.jpg", powder(300, 1000)), np.uint8)
    image, _ = decode_image(data, 1, "a.jpg", target=(128, 128))
    assert image.shape == (150, 500)  # 1/2: a 1/4 decode would be 75 rows, under 128
    image, _ = decode_image(data, 1, "a.jpg", target=(160, 128))
    assert image.shape == (300, 1000)  # no reduction keeps >= 160 rows


def test_reduced_decode_keeps_colour_conversions_and_skips_png(tmp_path):
    colour = np.dstack([powder(512, 512, s) for s in range(3)])
    data = np.fromfile(write(tmp_path / "c.jpg", colour), np.uint8)
    grey, _ = decode_image(data, 1, "c.jpg", target=(64, 64))
    rgb, _ = decode_image(data, 3, "c.jpg", target=(64, 64))
    assert grey.shape == (64, 64) and rgb.shape == (64, 64, 3)
    png = np.fromfile(write(tmp_path / "p.png", powder(512, 512)), np.uint8)
    assert decode_image(png, 1, "p.png", target=(64, 64))[0].shape == (512, 512)


def test_header_sizes_without_decoding(tmp_path):
    jpg = Path(write(tmp_path / "a.jpg", np.dstack([powder(120, 200)] * 3))).read_bytes()
    png = Path(write(tmp_path / "a.png", powder(30, 40))).read_bytes()
    assert jpeg_header(jpg) == ((200, 120), 3)
    assert image_size(png) == (40, 30)
    assert jpeg_header(jpg[:10]) is None  # truncated header: unknown
    assert image_size(b"not an image") is None
