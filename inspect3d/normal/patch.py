"""Patch anomaly scorers fitted on good layers, and the network that exports like a LayerNet.

Two scorers of a patch feature f (both plain torch, both export to ONNX as matmuls):

* ``patchcore``: distance to the nearest patch in a memory bank of good patches, the bank a
  greedy k-centre coreset of all good patches (PatchCore, Roth et al. 2022);
* ``gaussian``: Mahalanobis distance to one Gaussian of all good patches, with a shrunk
  covariance (PaDiM-like, but position-independent: ~20 layers cannot fit a covariance per
  position).

``NormalNet`` turns the distance map into what a supervised ``LayerNet`` returns (layer logits
and a logit map for the classes [normal, defect]), with logit (d - t) / T for the defect class:
``ScoringNet``'s defect score 1 - P(normal) = sigmoid((d - t) / T) is then >= 0.5 exactly where
the distance reaches the calibrated threshold t, and eval, export and scoring need no change.
"""

from __future__ import annotations

import torch
from torch import nn

from inspect3d.errors import InspectError

SCORERS = ("patchcore", "gaussian")
LAYER_SCORES = ("max", "topk")


class MemoryBank(nn.Module):
    """Distance of each patch to its nearest neighbour among ``bank`` (M, C) good patches."""

    def __init__(self, size: int, channels: int) -> None:
        super().__init__()
        self.register_buffer("bank", torch.zeros(size, channels))
        self.register_buffer("bank_sq", torch.zeros(size))

    def set_bank(self, bank: torch.Tensor) -> None:
        self.bank.copy_(bank)
        self.bank_sq.copy_((bank * bank).sum(1))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        n, c, h, w = feats.shape
        f = feats.flatten(2).transpose(1, 2)  # (N, hw, C)
        d2 = (f * f).sum(2, keepdim=True) - 2.0 * (f @ self.bank.T) + self.bank_sq
        nearest = d2.min(dim=2).values.clamp_min(0.0)
        return nearest.sqrt().reshape(n, 1, h, w)


class Gaussian(nn.Module):
    """Mahalanobis distance to one Gaussian: || W (f - mean) || with W W^T the precision."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("whiten", torch.eye(channels))

    def set_stats(self, mean: torch.Tensor, whiten: torch.Tensor) -> None:
        self.mean.copy_(mean)
        self.whiten.copy_(whiten)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        n, c, h, w = feats.shape
        f = feats.flatten(2).transpose(1, 2) - self.mean  # (N, hw, C)
        z = f @ self.whiten
        return (z * z).sum(2).sqrt().reshape(n, 1, h, w)


def make_scorer(kind: str, channels: int, bank_size: int) -> nn.Module:
    if kind == "patchcore":
        return MemoryBank(bank_size, channels)
    if kind == "gaussian":
        return Gaussian(channels)
    raise InspectError(f"normal.method={kind!r} is not valid: use one of {SCORERS}")


class NormalNet(nn.Module):
    """uint8 layers -> (layer logits (N, 2), logit map (N, 2, h, w)) for [normal, defect]."""

    def __init__(
        self, features: nn.Module, scorer: nn.Module, layer_score: str = "max", topk: int = 10
    ) -> None:
        super().__init__()
        if layer_score not in LAYER_SCORES:
            raise InspectError(
                f"normal.layer_score={layer_score!r} is not valid: use one of {LAYER_SCORES}"
            )
        self.features, self.scorer = features, scorer
        self.layer_score, self.topk = layer_score, topk
        # calibrated distance threshold and logistic temperature (set by fit_normal)
        self.register_buffer("threshold", torch.tensor(1.0))
        self.register_buffer("temperature", torch.tensor(1.0))

    def distances(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw anomaly distances: per layer (N,) and per patch (N, 1, h, w)."""
        dmap = self.scorer(self.features(x))
        flat = dmap.flatten(1)
        if self.layer_score == "max":
            return flat.max(dim=1).values, dmap
        k = min(self.topk, flat.shape[1])
        return flat.topk(k, dim=1).values.mean(dim=1), dmap

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        score, dmap = self.distances(x)
        z = (score - self.threshold) / self.temperature
        zmap = (dmap - self.threshold) / self.temperature
        logits = torch.stack([torch.zeros_like(z), z], dim=1)
        return logits, torch.cat([torch.zeros_like(zmap), zmap], dim=1)


BUILDER = "inspect3d.normal.patch.build_normal_net"


def build_normal_net(
    num_classes: int,
    pre,
    name: str = "efficientnet_lite0+patchcore",
    method: str = "patchcore",
    grid_stride: int = 16,
    layer_score: str = "topk",
    topk: int = 10,
    bank_size: int = 1024,
    pretrained: bool = True,
) -> NormalNet:
    """The network a normal-only checkpoint's ``model`` node describes (weights loaded after)."""
    from inspect3d.normal.features import PatchFeatures

    if num_classes != 2:
        raise InspectError(f"a normal-only model has 2 classes (normal, defect), not {num_classes}")
    features = PatchFeatures(pre, pretrained=pretrained, grid_stride=grid_stride)
    scorer = make_scorer(method, features.out_channels, bank_size)
    return NormalNet(features, scorer, layer_score, topk)
