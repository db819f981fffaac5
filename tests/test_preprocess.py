"""The single preprocessing: shapes, channels, dtypes, odd paths and bad files."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from inspect3d.data.preprocess import Preprocess, read_image
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
