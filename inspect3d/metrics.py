"""Quality figures from predictions (numpy only): what ``inspect3d eval`` and training report.

Every figure comes with its N; macro-F1, accuracy and AUROC get a 95% interval from a bootstrap
over *groups* (jobs or layer blocks), since layers of one job are not independent.
"""

from __future__ import annotations

import math

import numpy as np

from inspect3d.errors import InspectError


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def per_class(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 per class (0 where undefined)."""
    tp = np.diag(cm).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.nan_to_num(tp / cm.sum(axis=0))
        recall = np.nan_to_num(tp / cm.sum(axis=1))
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return precision, recall, f1


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Mean F1 over the classes present in ``y_true``."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    present = cm.sum(axis=1) > 0
    return float(per_class(cm)[2][present].mean())


def auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve (rank form, ties count half); None if one side is empty."""
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(np.asarray(scores, dtype=float))
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """95% Wilson score interval of a proportion k/n (sound for small n and k near 0 or n);
    None when n is 0."""
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise InspectError(f"k={k!r} is not valid for n={n!r}: use 0 <= k <= n")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)  # exact bounds, not rounding noise
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def calibrate_threshold(normal_scores: np.ndarray, target_frr: float) -> float:
    """Defect-score threshold that rejects at most ``target_frr`` of the normal layers given.

    A layer is rejected when its score is >= the threshold.
    """
    if not 0.0 <= target_frr < 1.0:
        raise InspectError(f"target_frr={target_frr!r} is not valid: use a rate in [0, 1)")
    s = np.sort(np.asarray(normal_scores, dtype=float))
    if s.size == 0:
        raise InspectError("cannot calibrate a threshold: no normal layers in the validation data")
    n_allowed = int(np.floor(target_frr * s.size))  # normals allowed at or above the threshold
    above = s[s.size - n_allowed - 1]  # highest normal score that must stay accepted
    return float(np.nextafter(above, np.inf))


def beta_quantile(q: float, a: int, b: int) -> float:
    """Quantile of Beta(a, b) for integers a, b >= 1, by bisection on its CDF, which for
    integers is a binomial tail: P(Beta(a, b) <= x) = P(Binomial(a + b - 1, x) >= a)."""
    n = a + b - 1

    def cdf(x: float) -> float:
        return sum(math.comb(n, j) * x**j * (1 - x) ** (n - j) for j in range(a, n + 1))

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return (lo + hi) / 2


def order_statistic_frr(n: int, n_allowed: int) -> dict:
    """False-reject rate on new good layers of a threshold just above the (n_allowed + 1)-th
    highest of ``n`` good-layer scores: Beta(k, n + 1 - k) with k = n_allowed + 1 whatever the
    score distribution (the layers exchangeable): mean k / (n + 1), 95% interval its 2.5% and
    97.5% quantiles."""
    if not 0 <= n_allowed < n:
        raise InspectError(f"n_allowed={n_allowed!r} is not valid for n={n!r}: use 0..n-1")
    k = n_allowed + 1
    return {
        "expected_frr": k / (n + 1),
        "frr_ci95": [beta_quantile(0.025, k, n + 1 - k), beta_quantile(0.975, k, n + 1 - k)],
        "n_calibration": n,
    }


def bootstrap_ci(
    stat,
    y_true: np.ndarray,
    probs: np.ndarray,
    groups: list[str] | None,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[float, float] | None:
    """95% percentile interval of ``stat(y_true, probs)`` resampling whole groups."""
    if n_boot <= 0 or len(y_true) == 0:
        return None
    keys = np.asarray(groups if groups is not None else np.arange(len(y_true)).astype(str))
    uniq, inverse = np.unique(keys, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(uniq), len(uniq))])
        v = stat(y_true[idx], probs[idx])
        if v is not None:
            values.append(v)
    if len(values) < n_boot // 2:
        return None
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def summarize(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    normal_index: int = 0,
    threshold: float | None = None,
    groups: list[str] | None = None,
    n_boot: int = 1000,
) -> dict:
    """All the figures of an evaluation as a JSON-ready dict."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=float)
    k = len(classes)
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, k)
    precision, recall, f1 = per_class(cm)
    is_defect = y_true != normal_index
    defect_score = 1.0 - probs[:, normal_index]

    def acc(t, p):
        return float((p.argmax(1) == t).mean())

    def mf1(t, p):
        return macro_f1(t, p.argmax(1), k)

    def roc(t, p):
        return auroc(t != normal_index, 1.0 - p[:, normal_index])

    out = {
        "n": int(len(y_true)),
        "n_normal": int((~is_defect).sum()),
        "n_defect": int(is_defect.sum()),
        "n_groups": len(set(groups)) if groups is not None else None,
        "classes": list(classes),
        "accuracy": acc(y_true, probs),
        "macro_f1": mf1(y_true, probs),
        "auroc": roc(y_true, probs),
        "confusion_matrix": cm.tolist(),
        "per_class": {
            c: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(cm[i].sum()),
            }
            for i, c in enumerate(classes)
        },
        "ci95": {
            name: bootstrap_ci(fn, y_true, probs, groups, n_boot)
            for name, fn in (("accuracy", acc), ("macro_f1", mf1), ("auroc", roc))
        },
    }
    if threshold is not None:
        out["threshold"] = _at_threshold(defect_score, is_defect, threshold)
    return out


def _at_threshold(score: np.ndarray, is_defect: np.ndarray, threshold: float) -> dict:
    rejected = score >= threshold
    normals, defects = int((~is_defect).sum()), int(is_defect.sum())
    return {
        "value": float(threshold),
        "false_reject_rate": float(rejected[~is_defect].mean()) if normals else None,
        "defect_recall": float(rejected[is_defect].mean()) if defects else None,
    }


def cell_auroc(maps: np.ndarray, masks: np.ndarray) -> float | None:
    """AUROC of defect-map grid cells against mask cells, pooled over all cells of all layers.

    Not the standard pixel AUROC (that one is ``inspect3d.localisation.PixelCurves``): a cell
    counts as defect when any mask pixel in it is, so it reads lower on thin defects."""
    return auroc(np.asarray(masks).ravel() > 0, np.asarray(maps, dtype=float).ravel())


def region_recall(
    maps: np.ndarray, regions: list[list[np.ndarray]], threshold: float
) -> tuple[float | None, int, int]:
    """Share of defect regions in which the defect map reaches ``threshold`` somewhere.

    ``regions[i]`` holds layer i's regions as boolean arrays on the map grid. Returns
    (recall or None without regions, regions found, regions in all).
    """
    found = total = 0
    for dmap, layer_regions in zip(maps, regions, strict=True):
        for cells in layer_regions:
            total += 1
            found += bool(cells.any() and dmap[cells].max() >= threshold)
    return (found / total if total else None), found, total
