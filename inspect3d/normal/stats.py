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


def at_most(x: torch.Tensor, n: int = 1_000_000) -> torch.Tensor:
    """At most ``n`` of the values ``x``, drawn at random with a fixed seed (torch.quantile
    refuses very large inputs)."""
    if len(x) <= n:
        return x
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]]


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


def layer_order_threshold(scores: np.ndarray, target_frr: float) -> tuple[float, int]:
    """Threshold and how many calibration scores lie at or above it (at most target_frr * n)."""
    s = np.sort(np.asarray(scores, dtype=float))
    n_allowed = int(np.floor(target_frr * s.size))
    return float(np.nextafter(s[s.size - n_allowed - 1], np.inf)), n_allowed
