"""Quality figures: checked against brute force and hand-worked examples."""

from __future__ import annotations

import numpy as np
import pytest

from inspect3d.errors import InspectError
from inspect3d.metrics import auroc, calibrate_threshold, macro_f1, summarize


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
