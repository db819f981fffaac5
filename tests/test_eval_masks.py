"""``inspect3d eval`` with defect masks: localisation figures of the defect map."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest

from inspect3d.data.manifest import Item
from inspect3d.errors import InspectError
from inspect3d.localisation import resize_map
from inspect3d.metrics import cell_auroc, region_recall
from inspect3d.train.evaluate import mask_metrics

from conftest import compose
from isolate import isolated


def eval_cfg(run, root, out, *extra: str):
    return compose(
        "eval",
        [f"run={run}", "data=folder", f"data.root={root}", "data.normal_class=ok", f"out={out}"]
        + list(extra),
    )


def write_mask(path, shape, boxes):
    mask = np.zeros(shape, np.uint8)
    for y0, y1, x0, x1 in boxes:
        mask[y0:y1, x0:x1] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), mask)


def write_layers(items, shape):
    for it in items:
        it.path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(it.path), np.full(shape, 128, np.uint8))


def test_cell_auroc_and_region_recall_on_known_maps():
    maps = np.zeros((2, 4, 4))
    masks = np.zeros((2, 4, 4), bool)
    masks[0, 0, 0] = masks[1, 3, 3] = True
    maps[0, 0, 0], maps[1, 3, 3], maps[1, 1, 1] = 0.9, 0.4, 0.6
    assert cell_auroc(maps, masks) == pytest.approx((30 + 29) / 60)  # 0.4 outranks 29 of 30
    regions = [[masks[0]], [masks[1]]]
    assert region_recall(maps, regions, 0.5) == (0.5, 1, 2)
    assert region_recall(maps, [[], []], 0.5) == (None, 0, 0)
    assert cell_auroc(maps, np.zeros_like(masks)) is None


def test_masks_by_stem_any_extension_area_rule_and_regions(tmp_path):
    items = [
        Item(tmp_path / "data" / c / f"{c}_{i}.png", c) for c in ("ok", "crack") for i in (0, 1)
    ]
    write_layers(items, (64, 64))
    root = tmp_path / "masks"
    # two regions on a 64 px mask: a single pixel and a block; .bmp, beside the layer stem
    write_mask(root / "crack_0.bmp", (64, 64), [(0, 1, 0, 1), (40, 56, 40, 56)])
    write_mask(root / "crack" / "crack_1.png", (64, 64), [(20, 24, 20, 24)])  # class sub-folder
    maps = np.zeros((4, 4, 4))
    maps[2, 0, 0] = 0.9  # finds the single-pixel region of crack_0 (area fraction > 0)
    m = mask_metrics(items, maps, root, threshold=0.5)
    assert m["n_masks"] == 2 and m["n_regions"] == 3 and m["n_regions_found"] == 1
    assert m["region_recall"] == pytest.approx(1 / 3)
    assert m["defect_map_grid"] == [4, 4] and 0 <= m["cell_auroc"] <= 1
    assert 0 <= m["pixel_auroc"] <= 1 and 0 <= m["aupro_30"] <= 1
    assert m["n_pixels"] == 4 * 64 * 64 and m["n_defect_pixels"] == 1 + 16 * 16 + 4 * 4


def exact_auroc(scores, defect):
    values, inverse = np.unique(scores, return_inverse=True)
    pos = np.bincount(inverse[defect], minlength=values.size).astype(float)
    neg = np.bincount(inverse[~defect], minlength=values.size).astype(float)
    return float(np.sum(pos * (np.cumsum(neg) - neg / 2)) / (pos.sum() * neg.sum()))


def test_maps_are_resized_to_each_layers_own_size(tmp_path):
    """Layers of 96x160 and 120x100 (not the model's input size); a mask at half size."""
    items = [Item(tmp_path / "d" / f"{n}.png", c) for n, c in [("a", "crack"), ("b", "crack")]]
    items.append(Item(tmp_path / "d" / "ok_0.png", "ok"))
    write_layers(items[:2], (96, 160))
    write_layers(items[2:], (120, 100))
    root = tmp_path / "masks"
    write_mask(root / "a.png", (96, 160), [(0, 48, 80, 160)])  # top-right quadrant
    write_mask(root / "b.png", (48, 80), [(0, 10, 0, 10)])  # half size: 0:20, 0:20 at 96x160
    maps = 0.1 * np.random.default_rng(7).random((3, 4, 4)).astype(np.float32)
    maps[0, 0, 3] = 0.9  # peak in a's defect
    maps[1, 3, 3] = 0.9  # peak far from b's defect
    m = mask_metrics(items, maps, root, threshold=0.5)
    assert m["n_pixels"] == 2 * 96 * 160 + 120 * 100 and m["n_masks_resized"] == 1
    full = [np.zeros((96, 160), bool), np.zeros((96, 160), bool), np.zeros((120, 100), bool)]
    full[0][0:48, 80:160] = full[1][0:20, 0:20] = True
    assert m["n_defect_pixels"] == 48 * 80 + 20 * 20
    resized = [resize_map(d, f.shape) for d, f in zip(maps, full, strict=True)]
    scores = np.concatenate([r.ravel() for r in resized])
    defect = np.concatenate([f.ravel() for f in full])
    assert m["pixel_auroc"] == pytest.approx(exact_auroc(scores, defect), abs=1e-3)
    peak = m["peak_on_defect"]
    assert (peak["hits"], peak["n"], peak["rate"]) == (1, 2, 0.5)
    lo, hi = peak["ci95"]
    assert lo < 0.5 < hi


def test_bad_mask_root_is_named(tmp_path):
    items = [Item(tmp_path / "ok" / "a.png", "ok")]
    write_layers(items, (8, 8))
    with pytest.raises(InspectError, match=r"data.mask_root='.*nowhere' is not a folder"):
        mask_metrics(items, np.zeros((1, 2, 2)), tmp_path / "nowhere", 0.5)
    (tmp_path / "m").mkdir()
    write_mask(tmp_path / "m" / "other.png", (8, 8), [(0, 2, 0, 2)])
    with pytest.raises(InspectError, match=r"no mask in data.mask_root=.*'a'"):
        mask_metrics(items, np.zeros((1, 2, 2)), tmp_path / "m", 0.5)


def test_eval_with_masks_writes_pixel_auroc(tiny_run, holdout_dir, tmp_path):
    from inspect3d.train.evaluate import evaluate_run

    masks = tmp_path / "masks"
    shutil.copytree(holdout_dir / "_masks", masks)  # synthetic masks, named like the layers
    out = tmp_path / "eval.json"
    metrics = isolated(
        evaluate_run, eval_cfg(tiny_run, holdout_dir, out, f"data.mask_root={masks}")
    )
    saved = json.loads(out.read_text())
    assert saved["pixel_auroc"] == metrics["pixel_auroc"] and 0 <= saved["pixel_auroc"] <= 1
    assert 0 <= saved["aupro_30"] <= 1 and 0 <= saved["cell_auroc"] <= 1
    assert "grid cells" in saved["cell_auroc_note"]
    assert saved["interval_groups"] == 5  # the hold-out set's 5 jobs: intervals resample jobs
    lo, hi = saved["pixel_auroc_ci95"]
    assert 0 <= lo <= saved["pixel_auroc"] <= hi <= 1
    peak = saved["peak_on_defect"]
    assert peak["n"] > 0 and peak["rate"] == pytest.approx(peak["hits"] / peak["n"])
    assert saved["peak_rss_mb"] > 0
    assert saved["n_regions"] > 0 and 0 <= saved["region_recall"] <= 1
    assert saved["region_threshold"] == pytest.approx(saved["threshold"]["value"])
    plain = isolated(evaluate_run, eval_cfg(tiny_run, holdout_dir, tmp_path / "plain.json"))
    assert "pixel_auroc" not in plain and "cell_auroc" not in plain  # the figures of before
    assert plain["peak_rss_mb"] > 0
