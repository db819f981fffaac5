"""Fitting the scorers (coreset, shrunk Gaussian) and the threshold's uncertainty (numpy/torch)."""

from __future__ import annotations

import math

import numpy as np
import torch


def greedy_coreset(
    patches: torch.Tensor, size: int, seed: int = 0, proj_dim: int = 64
) -> torch.Tensor:
    """Indices of ``size`` patches chosen by greedy k-centre (farthest point) selection.

    Distances are measured after a random projection to ``proj_dim`` dimensions (as PatchCore
    does) to keep selection fast; every good patch then lies close to a kept one.
    """
    n, c = patches.shape
    if size >= n:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    x = patches
    if c > proj_dim:
        x = patches @ (torch.randn(c, proj_dim, generator=gen) / math.sqrt(proj_dim))
    chosen = torch.empty(size, dtype=torch.long)
    chosen[0] = int(torch.randint(n, (1,), generator=gen))
    mind = ((x - x[chosen[0]]) ** 2).sum(1)
    for i in range(1, size):
        chosen[i] = int(mind.argmax())
        mind = torch.minimum(mind, ((x - x[chosen[i]]) ** 2).sum(1))
    return chosen


def shrunk_gaussian(patches: torch.Tensor, shrinkage: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and whitening matrix W (precision = W W^T) of a covariance shrunk towards
    ``tr(S)/C * I`` by ``shrinkage`` in [0, 1] (neighbouring patches are correlated, so the
    effective sample size is far below the patch count)."""
    x = patches.double()
    mean = x.mean(0)
    xc = x - mean
    cov = xc.T @ xc / max(1, x.shape[0] - 1)
    c = cov.shape[0]
    target = torch.eye(c, dtype=cov.dtype) * (torch.trace(cov) / c)
    cov = (1 - shrinkage) * cov + shrinkage * target + 1e-6 * torch.eye(c, dtype=cov.dtype)
    whiten = torch.linalg.cholesky(torch.linalg.inv(cov))
    return mean.float(), whiten.float()


def binom_tail(n: int, k: int, p: float) -> float:
    """P(Binomial(n, p) >= k)."""
    return float(sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k, n + 1)))


def beta_ppf(q: float, a: int, b: int) -> float:
    """Quantile of Beta(a, b) for integer a, b >= 1 (bisection on its binomial-sum CDF)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if binom_tail(a + b - 1, a, mid) < q:  # CDF of Beta(a, b) at mid
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def frr_of_order_statistic(n: int, n_allowed: int) -> dict:
    """False-reject rate of a threshold just above the (n_allowed+1)-th largest of ``n``
    exchangeable good-layer scores: Beta(k, n + 1 - k) with k = n_allowed + 1, whatever the
    score distribution. Its mean is k / (n + 1); the interval is its 2.5 and 97.5 % quantiles.
    """
    k = n_allowed + 1
    return {
        "expected_frr": k / (n + 1),
        "frr_ci95": [beta_ppf(0.025, k, n + 1 - k), beta_ppf(0.975, k, n + 1 - k)],
        "n_calibration": n,
    }


def layer_order_threshold(scores: np.ndarray, target_frr: float) -> tuple[float, int]:
    """Threshold and how many calibration scores lie at or above it (at most target_frr * n)."""
    s = np.sort(np.asarray(scores, dtype=float))
    n_allowed = int(np.floor(target_frr * s.size))
    return float(np.nextafter(s[s.size - n_allowed - 1], np.inf)), n_allowed
