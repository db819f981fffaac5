"""Localisation quality of defect maps against defect masks, at image resolution (numpy + cv2).

The figures are the ones MVTec AD and anomalib report, so they compare with published numbers:

- ``pixel_auroc``: every pixel of every layer is a sample (mask non-zero = defect);
- ``aupro``: per-region overlap (PRO) integrated over the false-positive rate up to a limit
  (0.3 by default) and divided by it, so a perfect map gives 1.0; each 8-connected region of a
  mask weighs the same, however large;
- ``peak_on_defect``: whether a layer's map maximum lies within a radius of a defect pixel.

Intervals: :meth:`PixelCurves.intervals` resamples whole groups of layers (jobs: pixels of one
layer, and layers of one job, are not independent samples) with replacement, the percentile
bootstrap of the field, from coarse per-group histograms.

Full-size maps of many layers do not fit in memory together (70 layers of 1280x1024 are ~90 M
pixels), so :class:`PixelCurves` keeps three histograms over fixed :class:`ScoreBins` and takes
one layer at a time. Counts at each bin edge are exact, so the ROC and PRO curves are exact at
every edge; only pairs of pixels inside one bin are approximated (counted as ties), which with
the default 65536 bins shifts the figures by well under 1e-3.

This module imports no torch: the scoring side can use it as well as ``inspect3d eval``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from inspect3d.errors import InspectError

N_BINS = 65536
SAMPLE_LIMIT = 1_000_000  # values used for the quantile edges; more changes nothing measurable
FPR_LIMIT = 0.3
PEAK_RADIUS = 16.0
GROUP_BINS = 2048  # per-group histograms for intervals: bins merged, memory bounded per group
N_BOOT = 1000


@dataclass(frozen=True)
class ScoreBins:
    """Fixed score bins: bin b holds scores in [edges[b], edges[b + 1]).

    The first bin reaches down to -inf and the last up to +inf, so no score falls outside.
    """

    edges: np.ndarray

    @classmethod
    def from_sample(cls, values: np.ndarray, n_bins: int = N_BINS) -> ScoreBins:
        """Edges from a sample of the scores to come: half at its quantiles (resolution where
        scores crowd, e.g. a saturated softmax near 0), half evenly over its range (resolution
        in sparse tails). For bilinear resizes of maps, the maps before resizing are such a
        sample: a resized value lies between source values."""
        if n_bins < 2:
            raise InspectError(f"n_bins={n_bins!r} is not valid: use at least 2 bins")
        v = np.asarray(values, dtype=np.float64).ravel()
        v = v[np.isfinite(v)]
        if v.size == 0:
            raise InspectError("cannot place score bins: the sample has no finite score")
        if v.size > SAMPLE_LIMIT:
            v = np.random.default_rng(0).choice(v, SAMPLE_LIMIT, replace=False)
        quantiles = np.quantile(v, np.linspace(0.0, 1.0, n_bins // 2))
        even = np.linspace(v.min(), v.max(), n_bins - n_bins // 2)
        return cls(np.unique(np.concatenate([quantiles, even])))

    @property
    def n(self) -> int:
        return int(self.edges.size)

    def index(self, scores: np.ndarray) -> np.ndarray:
        """Bin index of each score (same shape)."""
        idx = np.searchsorted(self.edges, scores, side="right") - 1
        return np.clip(idx, 0, self.n - 1)


class PixelCurves:
    """Histograms of clean pixels, defect pixels and region overlap, fed one layer at a time.

    ``add(score_map, mask)`` with the map at the mask's resolution; then ``pixel_auroc()`` and
    ``aupro()``. Memory: three arrays of ``bins.n`` numbers, whatever the number of layers,
    and three of at most ``GROUP_BINS`` per group (for :meth:`intervals`).
    """

    def __init__(self, bins: ScoreBins) -> None:
        self.bins = bins
        self.clean = np.zeros(bins.n, np.int64)
        self.defect = np.zeros(bins.n, np.int64)
        self.overlap = np.zeros(bins.n, np.float64)  # each region pixel weighs 1 / region size
        self.n_regions = 0
        # per group (job): clean, defect, overlap histograms on merged bins, and region count
        self._coarse = np.arange(bins.n) * min(GROUP_BINS, bins.n) // bins.n
        self.groups: dict[str, list] = {}

    def add(self, score_map: np.ndarray, mask: np.ndarray | None, group: str = "") -> None:
        """One layer: ``score_map`` (H, W); ``mask`` (H, W), non-zero = defect, None = clean;
        ``group``: the unit :meth:`intervals` resamples (a job; layers of one group go
        together)."""
        idx = self.bins.index(np.asarray(score_map))
        if mask is None:
            clean = np.bincount(idx.ravel(), minlength=self.bins.n)
            self.clean += clean
            self._add_group(group, clean, np.zeros(self.bins.n), np.zeros(self.bins.n), 0)
            return
        if mask.shape != idx.shape:
            raise InspectError(
                f"mask of shape {mask.shape} does not fit the map of shape {idx.shape}: "
                "bring both to the layer's size first"
            )
        defect = mask != 0
        clean = np.bincount(idx[~defect], minlength=self.bins.n)
        hit = np.bincount(idx[defect], minlength=self.bins.n)
        labels, sizes = regions(defect)
        overlap = np.zeros(self.bins.n)
        if sizes.size:
            weight = (1.0 / sizes)[labels[defect] - 1]
            overlap = np.bincount(idx[defect], weights=weight, minlength=self.bins.n)
        self.clean += clean
        self.defect += hit
        self.overlap += overlap
        self.n_regions += int(sizes.size)
        self._add_group(group, clean, hit, overlap, int(sizes.size))

    def _add_group(
        self, group: str, clean: np.ndarray, defect: np.ndarray, overlap: np.ndarray, n: int
    ) -> None:
        bins = int(self._coarse[-1]) + 1
        held = self.groups.setdefault(group, [np.zeros(bins), np.zeros(bins), np.zeros(bins), 0])
        for i, hist in enumerate((clean, defect, overlap)):
            held[i] += np.bincount(self._coarse, weights=hist, minlength=bins)
        held[3] += n

    def pixel_auroc(self) -> float | None:
        """AUROC over all pixels added (ties, and pairs in one bin, count half); None if all
        pixels are clean or all are defect."""
        return auroc_from_hist(self.clean, self.defect)

    def pro_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(FPR, PRO) at every bin edge as threshold (map >= edge), highest threshold first,
        starting at (0, 0) for a threshold above every score."""
        return pro_from_hist(self.clean, self.overlap, self.n_regions)

    def aupro(self, fpr_limit: float = FPR_LIMIT) -> float | None:
        """Area under PRO(FPR) for FPR in [0, fpr_limit], divided by ``fpr_limit`` (1.0 for a
        perfect map); None without clean pixels or without defect regions."""
        return aupro_from_hist(self.clean, self.overlap, self.n_regions, fpr_limit)

    def intervals(self, fpr_limit: float = FPR_LIMIT, n_boot: int = N_BOOT, seed: int = 0) -> dict:
        """95% percentile-bootstrap intervals of pixel AUROC and AUPRO over the groups
        (resampled with replacement), each ``None`` with fewer than 2 groups or when a resample
        can have no defect; ``n_groups`` says how many groups there were."""
        out = {"pixel_auroc_ci95": None, "aupro_ci95": None, "n_groups": len(self.groups)}
        if len(self.groups) < 2:
            return out
        held = list(self.groups.values())
        stacked = [np.stack([g[i] for g in held]) for i in range(3)]
        n_reg = np.array([g[3] for g in held], np.float64)
        draws = (
            np.random.default_rng(seed)
            .multinomial(len(held), np.full(len(held), 1.0 / len(held)), size=n_boot)
            .astype(np.float64)
        )
        clean, defect, overlap = (draws @ h for h in stacked)
        regions_drawn = draws @ n_reg
        rocs = [auroc_from_hist(c, d) for c, d in zip(clean, defect, strict=True)]
        pros = [aupro_from_hist(c, o, r, fpr_limit)
                for c, o, r in zip(clean, overlap, regions_drawn, strict=True)]  # fmt: skip
        out["pixel_auroc_ci95"] = _percentiles(rocs)
        out["aupro_ci95"] = _percentiles(pros)
        return out


def _percentiles(values: list[float | None]) -> list[float] | None:
    """2.5th and 97.5th percentiles of the resamples that have a figure (a resample without
    a defect has none); None when more than 5% of them have none."""
    kept = [v for v in values if v is not None]
    if len(kept) < 0.95 * len(values):
        return None
    return [float(q) for q in np.percentile(kept, [2.5, 97.5])]


def auroc_from_hist(clean: np.ndarray, defect: np.ndarray) -> float | None:
    """AUROC from score histograms of clean and defect pixels on the same bins (ties and pairs
    in one bin count half); None without pixels of either kind."""
    neg, pos = np.asarray(clean, np.float64), np.asarray(defect, np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return None
    below = np.cumsum(neg) - neg
    return float(np.dot(pos, below + 0.5 * neg) / (n_pos * n_neg))


def pro_from_hist(
    clean: np.ndarray, overlap: np.ndarray, n_regions: float
) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every bin edge as threshold, highest threshold first, from (0, 0)."""
    n_neg = float(np.sum(clean))
    if n_neg == 0 or n_regions == 0:
        raise InspectError("a PRO curve needs clean pixels and at least one defect region")
    fpr = _count_at_or_above(np.asarray(clean, np.float64)) / n_neg
    pro = _count_at_or_above(np.asarray(overlap, np.float64)) / n_regions
    return np.concatenate([[0.0], fpr[::-1]]), np.concatenate([[0.0], pro[::-1]])


def aupro_from_hist(
    clean: np.ndarray, overlap: np.ndarray, n_regions: float, fpr_limit: float = FPR_LIMIT
) -> float | None:
    """Normalised area under PRO(FPR) up to ``fpr_limit``; None without clean pixels or
    regions."""
    if np.sum(clean) == 0 or n_regions == 0:
        return None
    return area_up_to(*pro_from_hist(clean, overlap, n_regions), fpr_limit) / fpr_limit


def _count_at_or_above(hist: np.ndarray) -> np.ndarray:
    """Element b: total of bins b and above, i.e. of scores >= edges[b]."""
    return np.cumsum(hist[::-1])[::-1]


def area_up_to(fpr: np.ndarray, tpr: np.ndarray, limit: float) -> float:
    """Trapezoid area under a curve with non-decreasing ``fpr`` from 0 to ``limit``, the curve
    interpolated linearly at exactly ``limit``."""
    if not 0.0 < limit <= 1.0:
        raise InspectError(f"fpr_limit={limit!r} is not valid: use a rate in (0, 1]")
    inside = int(np.searchsorted(fpr, limit, side="right"))  # points with fpr <= limit
    x, y = fpr[:inside], tpr[:inside]
    if inside < fpr.size and x[-1] < limit:
        x0, x1, y0, y1 = fpr[inside - 1], fpr[inside], tpr[inside - 1], tpr[inside]
        x = np.append(x, limit)
        y = np.append(y, y0 + (y1 - y0) * (limit - x0) / (x1 - x0))
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def regions(defect: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected defect regions: label image (0 = clean, 1..n) and the n region sizes."""
    n, labels = cv2.connectedComponents(defect.astype(np.uint8), connectivity=8)
    sizes = np.bincount(labels.ravel(), minlength=n)[1:]
    return labels, sizes


def peak_on_defect(
    score_map: np.ndarray, mask: np.ndarray, radius: float = PEAK_RADIUS
) -> bool | None:
    """Whether the map's maximum (first one, in row order) lies within ``radius`` pixels
    (Euclidean) of a defect pixel of ``mask`` (same shape, non-zero = defect); None when the
    mask has no defect pixel."""
    defect = np.asarray(mask) != 0
    if not defect.any():
        return None
    # distance of every pixel to the nearest defect pixel (defect pixels are the zeros)
    dist = cv2.distanceTransform((~defect).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    peak = np.unravel_index(int(np.argmax(score_map)), defect.shape)
    return bool(dist[peak] <= radius)


def resize_map(score_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A defect map brought to ``size`` (height, width) bilinearly (cv2 INTER_LINEAR), float32."""
    h, w = size
    return cv2.resize(
        np.asarray(score_map, dtype=np.float32), (w, h), interpolation=cv2.INTER_LINEAR
    )
