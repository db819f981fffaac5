"""Quality figures: checked against brute force and hand-worked examples."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from inspect3d.errors import InspectError
from inspect3d.localisation import (
    PixelCurves,
    ScoreBins,
    area_up_to,
    peak_on_defect,
    resize_map,
)
from inspect3d.metrics import auroc, calibrate_threshold, macro_f1, summarize, wilson_interval


def brute_auroc(labels, scores):
    pos, neg = scores[labels], scores[~labels]
    return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


def test_auroc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.random(60) < 0.4
    scores = np.round(rng.random(60) + labels * 0.3, 1)  # rounding makes ties
    assert auroc(labels, scores) == pytest.approx(brute_auroc(labels, scores))
    assert auroc(np.ones(3, bool), np.arange(3)) is None


def test_macro_f1_hand_example():
    # class 0: tp=1 fp=1 fn=1 -> f1 0.5; class 1: tp=1 fp=1 fn=1 -> 0.5; class 2: tp=1 -> 1.0
    assert macro_f1(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 0, 2]), 3) == pytest.approx(2 / 3)


@pytest.mark.parametrize("target", [0.0, 0.05, 0.1, 0.3])
def test_threshold_keeps_false_rejects_at_or_below_target(target):
    normal = np.random.default_rng(1).random(200)
    t = calibrate_threshold(normal, target)
    frr = float((normal >= t).mean())
    assert frr <= target
    assert frr > target - 1 / len(normal) - 1e-12  # and not needlessly strict


def test_threshold_errors():
    with pytest.raises(InspectError, match="no normal layers"):
        calibrate_threshold(np.array([]), 0.05)
    with pytest.raises(InspectError, match="target_frr=1.5"):
        calibrate_threshold(np.array([0.1]), 1.5)


def test_summarize_reports_n_and_group_bootstrap_interval():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 90)
    probs = np.eye(3)[np.where(rng.random(90) < 0.8, y, (y + 1) % 3)] * 0.7 + 0.1
    groups = [f"job{i // 9}" for i in range(90)]
    m = summarize(y, probs, ["ok", "a", "b"], 0, threshold=0.5, groups=groups, n_boot=200)
    assert m["n"] == 90 and m["n_groups"] == 10
    lo, hi = m["ci95"]["macro_f1"]
    assert lo <= m["macro_f1"] <= hi
    assert set(m["per_class"]) == {"ok", "a", "b"}
    assert 0 <= m["threshold"]["false_reject_rate"] <= 1


def test_wilson_interval_known_values_and_errors():
    lo, hi = wilson_interval(0, 100)
    assert lo == 0.0 and hi == pytest.approx(0.0370, abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 0) is None
    with pytest.raises(InspectError, match="k=11 is not valid for n=10"):
        wilson_interval(11, 10)


# --- localisation: pixel AUROC, AUPRO, peak on defect ------------------------------------------


def exact_auroc(scores, defect):
    """Rank form over every pixel, ties half (numpy sorting only)."""
    values, inverse = np.unique(scores, return_inverse=True)
    pos = np.bincount(inverse[defect], minlength=values.size).astype(float)
    neg = np.bincount(inverse[~defect], minlength=values.size).astype(float)
    return float(np.sum(pos * (np.cumsum(neg) - neg / 2)) / (pos.sum() * neg.sum()))


def exact_aupro(maps, masks, limit=0.3):
    """PRO/FPR at every distinct score as threshold, trapezoids clipped at ``limit``."""
    scores = np.concatenate([m.ravel() for m in maps])
    region_of = np.concatenate([region_ids(k) for k in masks])  # -1 clean, 0.. region
    thresholds = np.unique(scores)[::-1]
    n_regions = region_of.max() + 1
    sizes = np.bincount(region_of[region_of >= 0], minlength=n_regions)
    clean = region_of < 0
    fpr, pro = [0.0], [0.0]
    for t in thresholds:
        hit = scores >= t
        fpr.append(hit[clean].mean())
        pro.append(np.mean(np.bincount(region_of[hit & ~clean], minlength=n_regions) / sizes))
    area = 0.0
    for x0, x1, y0, y1 in zip(fpr, fpr[1:], pro, pro[1:], strict=False):
        if x0 >= limit:
            break
        if x1 > limit:
            y1, x1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0), limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def region_ids(mask):
    """Per pixel: -1 when clean, else a region number unique over all calls in a test."""
    n, labels = cv2.connectedComponents((mask > 0).astype(np.uint8), connectivity=8)
    ids = labels.ravel().astype(np.int64) - 1
    ids[ids >= 0] += region_ids.offset
    region_ids.offset += n - 1
    return ids


def blob_masks(rng, n, shape, blobs=3):
    masks = np.zeros((n, *shape), np.uint8)
    for m in masks:
        for _ in range(blobs):
            y, x = rng.integers(0, shape[0] - 8), rng.integers(0, shape[1] - 8)
            m[y : y + rng.integers(1, 9), x : x + rng.integers(1, 9)] = 1
    return masks


def curves_of(maps, masks, sample=None):
    curves = PixelCurves(ScoreBins.from_sample(maps if sample is None else sample))
    for dmap, mask in zip(maps, masks, strict=True):
        curves.add(dmap, mask if mask.any() else None)
    return curves


@pytest.mark.parametrize("saturated", [False, True])
def test_pixel_curves_match_exact_computation(saturated):
    region_ids.offset = 0
    rng = np.random.default_rng(3)
    masks = blob_masks(rng, 4, (48, 64))
    masks[3] = 0  # a good layer without defect pixels
    maps = rng.random(masks.shape) + 0.8 * masks
    if saturated:  # most scores crowd near 0, as from a confident softmax
        maps = np.exp(-12 * (1.5 - maps))
    curves = curves_of(maps, masks)
    defect = masks.ravel() > 0
    assert curves.pixel_auroc() == pytest.approx(exact_auroc(maps.ravel(), defect), abs=1e-3)
    assert curves.aupro(0.3) == pytest.approx(exact_aupro(maps, masks), abs=1e-3)
    assert curves.n_regions == region_ids.offset


def test_pixel_curves_with_bins_from_coarse_maps_as_in_eval():
    """Bins from the model-resolution maps; scores from their bilinear resize to layer size."""
    region_ids.offset = 0
    rng = np.random.default_rng(4)
    masks = blob_masks(rng, 3, (90, 120), blobs=4)
    coarse = rng.random((3, 9, 12)) ** 3
    coarse += 0.5 * np.stack([cv2.resize(m.astype(np.float32), (12, 9)) for m in masks])
    maps = np.stack([resize_map(c, (90, 120)) for c in coarse])
    curves = curves_of(maps, masks, sample=coarse)
    assert curves.pixel_auroc() == pytest.approx(exact_auroc(maps.ravel(), masks.ravel() > 0), 1e-3)
    assert curves.aupro(0.3) == pytest.approx(exact_aupro(maps, masks), abs=1e-3)


def test_aupro_is_one_for_a_perfect_map_and_small_for_an_inverted_one():
    rng = np.random.default_rng(5)
    masks = blob_masks(rng, 3, (40, 40))
    noise = 0.1 * rng.random(masks.shape)
    perfect = curves_of(masks + noise, masks)
    assert perfect.aupro() == pytest.approx(1.0, abs=1e-6)
    assert perfect.pixel_auroc() == pytest.approx(1.0)
    inverted = curves_of(1.0 - masks + noise, masks)
    assert inverted.aupro() < 0.01 and inverted.pixel_auroc() < 0.01


def test_pro_weighs_regions_equally_unlike_pixel_auroc():
    mask = np.zeros((1, 100, 100), np.uint8)
    mask[0, 10:50, 10:50] = 1  # big region: 1600 px
    mask[0, 80:83, 80:83] = 1  # small region: 9 px
    rng = np.random.default_rng(6)
    base = np.where(mask > 0, 0.0, 0.1 + 0.5 * rng.random(mask.shape))  # missed: below clean
    finds_big = base.copy()
    finds_big[0, 10:50, 10:50] = 1.0
    finds_small = base.copy()
    finds_small[0, 80:83, 80:83] = 1.0
    big, small = curves_of(finds_big, mask), curves_of(finds_small, mask)
    assert big.pixel_auroc() > 0.99 and small.pixel_auroc() < 0.01
    # each region is half of PRO, whatever its size: finding either one gives 0.5
    assert big.aupro() == pytest.approx(0.5, abs=1e-3)
    assert small.aupro() == pytest.approx(0.5, abs=1e-3)


def grouped_layers(rng, n_groups, per_group, spread):
    """Layers of ``n_groups`` jobs; each job's maps separate defects by its own margin (the
    margins differ by ``spread``), so resampling jobs moves the figures."""
    masks = blob_masks(rng, n_groups * per_group, (24, 24))
    margin = np.repeat(0.6 + spread * rng.standard_normal(n_groups), per_group)
    maps = rng.random(masks.shape) + margin[:, None, None] * masks
    return maps, masks, np.repeat([f"job{g}" for g in range(n_groups)], per_group)


def test_intervals_are_the_bootstrap_over_jobs_computed_exactly():
    rng = np.random.default_rng(7)
    maps, masks, jobs = grouped_layers(rng, 6, 2, spread=0.3)
    curves = PixelCurves(ScoreBins.from_sample(maps))
    for dmap, mask, job in zip(maps, masks, jobs, strict=True):
        curves.add(dmap, mask, group=job)
    got = curves.intervals(n_boot=20, seed=3)
    draws = np.random.default_rng(3).multinomial(6, np.full(6, 1 / 6), size=20)
    rocs, pros = [], []
    for counts in draws:
        layers = [i for g, c in enumerate(counts) for _ in range(c) for i in (2 * g, 2 * g + 1)]
        region_ids.offset = 0
        rocs.append(exact_auroc(maps[layers].ravel(), masks[layers].ravel() > 0))
        pros.append(exact_aupro(maps[layers], masks[layers]))
    assert got["n_groups"] == 6
    assert got["pixel_auroc_ci95"] == pytest.approx(np.percentile(rocs, [2.5, 97.5]), abs=2e-3)
    assert got["aupro_ci95"] == pytest.approx(np.percentile(pros, [2.5, 97.5]), abs=5e-3)
    lo, hi = got["pixel_auroc_ci95"]
    assert lo < curves.pixel_auroc() < hi


def test_intervals_widen_when_jobs_disagree_and_need_two_jobs():
    def width(spread):
        maps, masks, jobs = grouped_layers(np.random.default_rng(8), 8, 2, spread)
        curves = PixelCurves(ScoreBins.from_sample(maps))
        for dmap, mask, job in zip(maps, masks, jobs, strict=True):
            curves.add(dmap, mask, group=job)
        lo, hi = curves.intervals(n_boot=200)["pixel_auroc_ci95"]
        return hi - lo

    assert width(0.4) > 3 * width(0.0)
    one_job = curves_of(*grouped_layers(np.random.default_rng(9), 1, 3, 0.1)[:2])
    assert one_job.intervals() == {"pixel_auroc_ci95": None, "aupro_ci95": None, "n_groups": 1}


def test_area_up_to_interpolates_at_the_limit():
    fpr, tpr = np.array([0.0, 0.0, 0.2, 0.5, 1.0]), np.array([0.0, 0.4, 1.0, 1.0, 1.0])
    assert area_up_to(fpr, tpr, 0.3) == pytest.approx(0.2 * 0.7 + 0.1)
    assert area_up_to(fpr, tpr, 0.2) == pytest.approx(0.14)
    with pytest.raises(InspectError, match="fpr_limit=0 is not valid"):
        area_up_to(fpr, tpr, 0)


def test_peak_on_defect_hits_within_16_px_and_misses_beyond():
    mask = np.zeros((64, 200), np.uint8)
    mask[20:30, 20:30] = 255
    for x, hit in [(25, True), (29 + 16, True), (29 + 17, False), (150, False)]:
        score = np.zeros(mask.shape, np.float32)
        score[25, x] = 1.0
        assert peak_on_defect(score, mask) is hit, x
    assert peak_on_defect(score, np.zeros_like(mask)) is None


def test_localisation_errors_name_the_value():
    with pytest.raises(InspectError, match="n_bins=1 is not valid"):
        ScoreBins.from_sample(np.arange(5.0), 1)
    with pytest.raises(InspectError, match="no finite score"):
        ScoreBins.from_sample(np.array([np.nan]))
    curves = PixelCurves(ScoreBins.from_sample(np.arange(5.0)))
    with pytest.raises(InspectError, match=r"mask of shape \(2, 2\) does not fit .* \(3, 3\)"):
        curves.add(np.zeros((3, 3)), np.zeros((2, 2)))
    curves.add(np.zeros((3, 3)), None)
    assert curves.pixel_auroc() is None and curves.aupro() is None
