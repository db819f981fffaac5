"""The region of interest on overlays: outlined where the polygon is, named in the legend.

Synthetic layer, map and polygon; no model.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from inspect3d.errors import InspectError
from inspect3d.infer.overlay import (
    ROI_COLOUR,
    draw_roi,
    evidence_image,
    legend,
    overlay,
    roi_points,
    write_overlay,
)
from inspect3d.review.images import projections

ROI = [[0.25, 0.25], [0.75, 0.25], [0.75, 0.75], [0.25, 0.75]]  # the middle half of the layer


def _is_roi(img: np.ndarray) -> np.ndarray:
    return np.all(img == ROI_COLOUR, axis=-1)


def _layer_and_map(h: int = 96, w: int = 128) -> tuple[np.ndarray, np.ndarray]:
    grey = np.full((h, w), 120, np.uint8)
    dmap = np.zeros((h // 8, w // 8), np.float32)
    dmap[5:7, 6:9] = 2.0  # over the threshold, inside the ROI: the outline stays on top
    return grey, dmap


def test_overlay_outlines_the_roi_where_the_polygon_is_and_nowhere_else():
    grey, dmap = _layer_and_map()
    img = overlay(grey, dmap, 1.0, roi=ROI)
    mask = _is_roi(img)
    ys, xs = np.nonzero(mask)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (32, 96, 24, 72)  # 0.25..0.75 of 128, 96
    assert mask[24, 32:97].all() and mask[72, 32:97].all()  # top and bottom edges
    assert mask[24:73, 32].all() and mask[24:73, 96].all()  # left and right edges
    assert not mask[30:67, 38:91].any()  # a line, not a filled area
    assert not _is_roi(overlay(grey, dmap, 1.0)).any()  # no ROI: nothing drawn


def test_roi_is_drawn_into_a_box_and_thicker_on_large_pictures():
    canvas = np.zeros((60, 80, 3), np.uint8)
    draw_roi(canvas, [[0, 0], [1, 0], [1, 1], [0, 1]], (10, 20, 40, 30))
    ys, xs = np.nonzero(_is_roi(canvas))
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (10, 49, 20, 49)  # clipped into the box
    big = draw_roi(np.zeros((1024, 1024, 3), np.uint8), ROI)
    assert _is_roi(big)[256, 400:600].any() and _is_roi(big)[254:260, 500].sum() >= 2


def test_evidence_image_has_the_roi_legend_entry_only_with_a_roi():
    grey, dmap = _layer_and_map()
    plain, with_roi = (
        evidence_image(grey, dmap, 1.0, ["x"]),
        evidence_image(grey, dmap, 1.0, ["x"], ROI),
    )
    extra = legend(128, 1.0, roi=True).shape[0] - legend(128, 1.0).shape[0]
    assert extra > 0 and with_roi.shape[0] == plain.shape[0] + extra
    assert _is_roi(with_roi[-extra:]).any()  # the key's line sample, in the outline's colour


def test_written_overlay_and_top_view_carry_the_outline(tmp_path):
    grey, dmap = _layer_and_map()
    cv2.imwrite(str(tmp_path / "layer_0001.png"), grey)
    path = write_overlay(tmp_path / "layer_0001.png", dmap, tmp_path / "out", 1.0, roi=ROI)
    assert np.all(cv2.imread(str(path)) == ROI_COLOUR, axis=-1).sum() > 4 * 40
    views = projections(np.stack([dmap, dmap]).astype(np.float16), 1.0, [1, 2], (96, 128), ROI)
    assert _is_roi(views["top"]).sum() > 4 * 40 and not _is_roi(views["side"]).any()


@pytest.mark.parametrize(
    "bad", [[[0, 0], [1, 1]], [0.1, 0.1, 0.9, 0.9], "plate", [[0, 0], [1, "a"], [1, 1]]]
)
def test_a_roi_that_is_not_a_polygon_is_named(bad):
    with pytest.raises(InspectError, match="roi=.* is not valid"):
        roi_points(bad)
