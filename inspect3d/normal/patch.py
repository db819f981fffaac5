"""Patch anomaly scorers fitted on good layers, and the network that exports like a LayerNet.

Two scorers of a patch feature f (both plain torch, both export to ONNX as matmuls):

* ``patchcore``: distance to the nearest patch in a memory bank of good patches, the bank a
  greedy k-centre coreset of all good patches (PatchCore, Roth et al. 2022); the search runs
  over the bank in chunks, so memory stays bounded at any bank size and layer size. By
  default features are whitened first (``Whiten``: the good patches' shrunk covariance), so
  the search measures Mahalanobis-like distances: powder texture varies a lot along a few
  feature directions, and a faint defect moves a patch along the quiet ones, which plain
  Euclidean distances drown in the texture's variation;
* ``gaussian``: Mahalanobis distance to one Gaussian of all good patches, with a shrunk
  covariance (PaDiM-like, but position-independent: ~20 layers cannot fit a covariance per
  position).

``NormalNet`` smooths the distance map (Gaussian, as PatchCore smooths its upsampled map),
fuses it with the layer's pixel evidence (``PixelEvidence``: 1-3 px lines, specks and pits
that stride-8 ImageNet features dilute) as deep^(1-w) * pixel^w, zeroes it outside the region
of interest (the build plate), and scores the layer by the mean of its top-k cells. The
product asks a cell to stand out in both: the pixel evidence alone lights every part rim, the
deep distance alone misses faint pixel-scale defects in real powder (``pixel_weight`` 0,
the default: no fusion). For training-side code it returns what a supervised ``LayerNet`` returns
(layer logits and a logit map for [normal, defect]); ``scoring`` gives what is exported:
P(defect) = sigmoid((score - t) / T), >= 0.5 exactly where the layer score reaches the
calibrated threshold t, and the defect map in units of t (1.0 = threshold, unbounded above),
so the map keeps its order everywhere instead of saturating.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inspect3d.errors import InspectError
from inspect3d.normal.features import (
    RESIDUAL_CHANNELS,
    PatchFeatures,
    PixelResidual,
    gaussian_1d,
)
from inspect3d.normal.roi import roi_on_grid
from inspect3d.normal.stats import at_most

SCORERS = ("patchcore", "gaussian")
PIXEL_QUANTILE = 0.99  # each pixel response's unit: its 99th percentile over good cells
LAYER_SCORES = ("max", "topk")
BANK_CHUNK = 2048  # bank rows per matmul: (h*w, 2048) floats per layer at a time
NEIGHBOURS = 8  # nearest bank patches whose residual channels a patch is compared with


class MemoryBank(nn.Module):
    """Distance of each patch to its nearest neighbour among ``bank`` (M, C) good patches.

    With ``extra`` > 0 channels after the first ``channels`` (``PixelResidual``'s), those are
    judged in context: among the ``NEIGHBOURS`` bank patches nearest in the first channels, the
    one whose residual is closest sets a residual distance, added with ``res_weight``. A
    part's bright rim has rims among its neighbours; a faint streak in plain powder has only
    plain powder there. Residuals are compared on a log-like scale (``_compress``: linear up to
    the good patches' typical response, logarithmic beyond), so a new part's rim twice as
    bright as the fitted parts' is still a rim, while a streak a few times the grain stands out.
    """

    def __init__(self, size: int, channels: int, extra: int = 0) -> None:
        super().__init__()
        self.channels, self.extra = channels, extra
        self.register_buffer("bank", torch.zeros(size, channels))
        self.register_buffer("bank_sq", torch.zeros(size))
        self.register_buffer("center", torch.zeros(channels))
        if extra:
            self.register_buffer("res_bank", torch.zeros(size, extra))
            self.register_buffer("res_scale", torch.ones(extra))
            self.register_buffer("res_weight", torch.tensor(1.0))

    def set_bank(
        self, bank: torch.Tensor, sample: torch.Tensor | None = None, weight: float = 1.0
    ) -> None:
        """``bank`` (M, channels + extra); ``sample``: good patches (n, channels + extra) that
        set the residual channels' scales and weight (each channel's median size; the weight
        makes the residual distance's 99th percentile over ``sample`` ``weight`` times that of
        the nearest-patch distance)."""
        deep = bank[:, : self.channels]
        # distances are computed about the bank's mean: |f|^2 + |b|^2 - 2 f.b then cancels far
        # less in float32 (feature norms are large next to the distances between patches)
        self.center.copy_(deep.mean(0))
        centred = deep - self.center
        self.bank.copy_(centred)
        self.bank_sq.copy_((centred * centred).sum(1))
        if not self.extra:
            return
        if sample is not None:  # the typical (median) size of each residual response
            typical = sample[:, self.channels :].abs().median(dim=0).values
            self.res_scale.copy_(typical.clamp_min(1e-3))
        self.res_bank.copy_(self._compress(bank[:, self.channels :]))
        if sample is None:
            return
        with torch.inference_mode():
            nearest, residual = self._distances(sample.T[None, :, :, None])
        q = torch.quantile(at_most(residual.flatten()), 0.99).clamp_min(1e-6)
        ratio = torch.quantile(at_most(nearest.flatten()), 0.99) / q
        self.res_weight.fill_(weight * float(ratio))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        n, _, h, w = feats.shape
        if not self.extra:
            return self._nearest(feats).reshape(n, 1, h, w)
        nearest, residual = self._distances(feats)
        return (nearest + self.res_weight * residual).reshape(n, 1, h, w)

    def _centred(self, feats: torch.Tensor) -> torch.Tensor:
        return feats[:, : self.channels].flatten(2).transpose(1, 2) - self.center  # (N, hw, C)

    def _chunks(self, f: torch.Tensor):
        """(first bank row, |b|^2 - 2 f.b for the next ``BANK_CHUNK`` bank rows) in turn."""
        for start in range(0, self.bank.shape[0], BANK_CHUNK):
            bank = self.bank[start : start + BANK_CHUNK]
            yield start, self.bank_sq[start : start + BANK_CHUNK] - 2.0 * (f @ bank.T)

    def _nearest(self, feats: torch.Tensor) -> torch.Tensor:
        f = self._centred(feats)
        nearest = None
        for _, d2 in self._chunks(f):
            part = d2.min(dim=2).values
            nearest = part if nearest is None else torch.minimum(nearest, part)
        return (nearest + (f * f).sum(2)).clamp_min(0.0).sqrt()

    def _distances(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, hw) nearest-patch distances and residual distances among the neighbours."""
        f = self._centred(feats)
        d2, idx = [], []
        for start, part in self._chunks(f):
            vals, where = part.topk(min(NEIGHBOURS, part.shape[2]), dim=2, largest=False)
            d2.append(vals)
            idx.append(where + start)
        d2, idx = torch.cat(d2, dim=2), torch.cat(idx, dim=2)
        if d2.shape[2] > NEIGHBOURS:  # several chunks: the nearest of their nearest
            d2, keep = d2.topk(NEIGHBOURS, dim=2, largest=False)
            idx = idx.gather(2, keep)
        nearest = (d2[..., 0] + (f * f).sum(2)).clamp_min(0.0).sqrt()
        res = self._compress(feats[:, self.channels :].flatten(2).transpose(1, 2))  # (N, hw, R)
        diff = res[:, :, None, :] - self.res_bank[idx]  # (N, hw, K, R)
        residual = (diff * diff).sum(3).min(dim=2).values.sqrt()
        return nearest, residual

    def _compress(self, res: torch.Tensor) -> torch.Tensor:
        """asinh(res / scale), written out (sign-symmetric, exact for either sign)."""
        x = res / self.res_scale
        a = x.abs()
        return torch.sign(x) * torch.log(a + torch.sqrt(a * a + 1.0))


class Whiten(nn.Module):
    """(N, C, h, w) features -> (N, C, h, w), the first ``channels`` in the good patches'
    whitened coordinates, any further (residual) channels as they are."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("whiten", torch.eye(channels))

    def set_stats(self, mean: torch.Tensor, whiten: torch.Tensor) -> None:
        self.mean.copy_(mean)
        self.whiten.copy_(whiten)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        c = self.mean.shape[0]
        f = feats[:, :c].permute(0, 2, 3, 1) - self.mean  # (N, h, w, C)
        white = (f @ self.whiten).permute(0, 3, 1, 2)
        return white if feats.shape[1] == c else torch.cat([white, feats[:, c:]], dim=1)


class Gaussian(Whiten):
    """Mahalanobis distance to one Gaussian: || W (f - mean) || with W W^T the precision."""

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        z = super().forward(feats)  # (N, C, h, w) whitened
        return (z * z).sum(1, keepdim=True).sqrt()


class PixelEvidence(nn.Module):
    """uint8 layers (N, C, H, W) -> (N, 1, h, w): the strongest of ``PixelResidual``'s 8
    responses in each cell (thin lines, specks, pits; bright and dark), each in units of its
    ``PIXEL_QUANTILE`` over the good layers' cells. It needs no memory: plain powder's grain
    sets the units, and the deep distance it is fused with (``NormalNet``) says where
    structure (a part, a rim) is expected."""

    def __init__(self, grid_stride: int = 8) -> None:
        super().__init__()
        self.residual = PixelResidual()
        self.grid_stride = grid_stride
        self.register_buffer("scale", torch.ones(RESIDUAL_CHANNELS))

    def responses(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 8, h, w) responses on the feature grid (stride 8, or 16: max over 2x2)."""
        return self.residual.on_grid(x, self.grid_stride)

    def set_scale(self, responses: torch.Tensor, inside: torch.Tensor) -> None:
        """``responses`` (N, 8, h, w) of good layers; ``inside`` (N, h, w) bool, the cells
        inspected (the ROI)."""
        sample = responses.permute(1, 0, 2, 3)[:, inside]  # (8, cells)
        for c in range(sample.shape[0]):
            q = torch.quantile(at_most(sample[c]), PIXEL_QUANTILE)
            self.scale[c] = q.clamp_min(1e-3)

    def evidence(self, responses: torch.Tensor) -> torch.Tensor:
        return (responses / self.scale.view(1, -1, 1, 1)).amax(1, keepdim=True).clamp_min(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.evidence(self.responses(x))


def make_scorer(kind: str, channels: int, bank_size: int, extra: int = 0) -> nn.Module:
    if kind == "patchcore":
        return MemoryBank(bank_size, channels, extra)
    if kind == "gaussian":
        return Gaussian(channels)
    raise InspectError(f"normal.method={kind!r} is not valid: use one of {SCORERS}")


def gaussian_kernel(sigma_cells: float) -> torch.Tensor:
    """A normalised 2-D Gaussian (1, 1, k, k), k = 2 * ceil(2 sigma) + 1; [[1]] for sigma 0."""
    if sigma_cells <= 0:
        return torch.ones(1, 1, 1, 1)
    g = gaussian_1d(sigma_cells, reach=2.0)
    return (g[:, None] * g[None, :])[None, None]


class NormalNet(nn.Module):
    """uint8 layers -> (layer logits (N, 2), logit map (N, 2, h, w)) for [normal, defect]."""

    def __init__(
        self,
        features: nn.Module,
        scorer: nn.Module,
        layer_score: str = "max",
        topk: int = 10,
        smooth_cells: float = 0.0,
        roi: np.ndarray | None = None,
        part_scorer: nn.Module | None = None,
        whiten: nn.Module | None = None,
        pixel_weight: float = 0.0,
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
        self.register_buffer("smooth", gaussian_kernel(smooth_cells), persistent=False)
        # region of interest on the map grid (1 inside, 0 outside); None: the whole layer
        roi_t = None if roi is None else torch.from_numpy(roi.astype(np.float32))[None, None]
        self.register_buffer("roi", roi_t, persistent=False)
        # with part masks at fit time: a memory of part (and part outline) patches, and the
        # scale that puts a part cell's distance to it in the units of powder distances
        self.part_scorer = part_scorer
        self.register_buffer("part_scale", torch.tensor(1.0))
        self.whiten = whiten  # None: the scorers see the features as they are
        # pixel evidence fused with the smoothed deep distance: deep^(1-w) * pixel^w
        self.pixel_weight = float(pixel_weight)
        grid_stride = getattr(features, "grid_stride", 8)
        self.pixel = PixelEvidence(grid_stride) if self.pixel_weight > 0 else None

    def raw_maps(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Patch distances to the powder memory and to the part memory (None without one)."""
        if self.whiten is not None:
            feats = self.whiten(feats)
        part = None if self.part_scorer is None else self.part_scorer(feats)
        return self.scorer(feats), part

    def combine(
        self, powder: torch.Tensor, part: torch.Tensor | None, cells: torch.Tensor | None
    ) -> torch.Tensor:
        """One distance per patch: the nearest of both memories; on cells marked as part
        (``cells`` > 0, from the layer's part mask) no more than the distance to the part memory
        divided by the part scale: a part patch is normal when it looks like any good patch,
        or ordinary among good parts."""
        if part is None:
            return powder
        union = torch.minimum(powder, part)
        if cells is None:
            return union
        return torch.where(cells > 0, torch.minimum(union, part / self.part_scale), union)

    def distance_map(self, x: torch.Tensor, cells: torch.Tensor | None = None) -> torch.Tensor:
        """Smoothed anomaly distances per patch (N, 1, h, w), 0 outside the ROI."""
        dmap = self.combine(*self.raw_maps(self.features(x)), cells)
        return self.post_process(dmap, None if self.pixel is None else self.pixel(x))

    def post_process(self, dmap: torch.Tensor, pixel: torch.Tensor | None = None) -> torch.Tensor:
        """Raw patch distances -> smoothed, fused with the ``pixel`` evidence (N, 1, h', w'
        from ``PixelEvidence``; cropped to the map), 0 outside the ROI."""
        k = self.smooth.shape[-1]
        if k > 1:
            dmap = F.conv2d(F.pad(dmap, [k // 2] * 4, mode="replicate"), self.smooth)
        if pixel is not None:
            pixel = pixel[..., : dmap.shape[-2], : dmap.shape[-1]]
            w = self.pixel_weight
            dmap = dmap.clamp_min(0.0) ** (1.0 - w) * pixel**w
        if self.roi is not None:
            if self.roi.shape[-2:] != dmap.shape[-2:]:
                raise InspectError(
                    f"layer input gives a {tuple(dmap.shape[-2:])} map but the ROI was made for "
                    f"{tuple(self.roi.shape[-2:])}: score layers at the model's input size"
                )
            dmap = dmap * self.roi
        return dmap

    def distances(
        self, x: torch.Tensor, cells: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly distances: per layer (N,) and per patch (N, 1, h, w)."""
        dmap = self.distance_map(x, cells)
        return self.layer_distance(dmap), dmap

    def layer_distance(self, dmap: torch.Tensor) -> torch.Tensor:
        flat = dmap.flatten(1)
        if self.layer_score == "max":
            return flat.max(dim=1).values
        k = min(self.topk, flat.shape[1])
        return flat.topk(k, dim=1).values.mean(dim=1)

    def forward(
        self, x: torch.Tensor, cells: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        score, dmap = self.distances(x, cells)
        z = (score - self.threshold) / self.temperature
        zmap = (dmap - self.threshold) / self.temperature
        logits = torch.stack([torch.zeros_like(z), z], dim=1)
        return logits, torch.cat([torch.zeros_like(zmap), zmap], dim=1)

    def scoring(
        self, x: torch.Tensor, cells: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What is exported: probs (N, 2) and the defect map in threshold units (N, 1, h, w).
        ``cells``: the layer's part cells (N, 1, h, w), an input of models fitted with parts."""
        score, dmap = self.distances(x, cells)
        defect = torch.sigmoid((score - self.threshold) / self.temperature)
        return torch.stack([1.0 - defect, defect], dim=1), dmap / self.threshold


BUILDER = "inspect3d.normal.patch.build_normal_net"


def build_normal_net(
    num_classes: int,
    pre,
    name: str = "efficientnet_lite0+patchcore",
    method: str = "patchcore",
    grid_stride: int = 8,
    layer_score: str = "topk",
    topk: int = 10,
    bank_size: int = 1024,
    pretrained: bool = True,
    smooth_px: float = 0.0,
    roi: list | None = None,
    part_bank_size: int = 0,
    whiten: bool = False,
    residual: bool = False,
    pixel_weight: float = 0.0,
) -> NormalNet:
    """The network a normal-only checkpoint's ``model`` node describes (weights loaded after).

    ``roi``: the plate polygon in fractions of the layer ([[x, y], ...]), None for all of it.
    ``part_bank_size`` > 0: part patches get a memory of their own (fitted with part masks).
    ``whiten``: the memory banks compare whitened features (False in models fitted before it).
    ``residual``: patchcore patches carry ``PixelResidual`` channels (False before it).
    ``pixel_weight`` > 0: the map fuses ``PixelEvidence`` with that exponent (0 before it).
    """
    if num_classes != 2:
        raise InspectError(f"a normal-only model has 2 classes (normal, defect), not {num_classes}")
    residual = residual and method == "patchcore"
    features = PatchFeatures(pre, pretrained, grid_stride, residual=residual)
    deep, extra = features.deep_channels, features.out_channels - features.deep_channels
    scorer = make_scorer(method, deep, bank_size - part_bank_size, extra)
    mask = None if roi is None else roi_on_grid(roi, features.grid(pre.height, pre.width))
    parts = MemoryBank(part_bank_size, deep, extra) if part_bank_size > 0 else None
    white = Whiten(deep) if whiten and method == "patchcore" else None
    return NormalNet(
        features,
        scorer,
        layer_score,
        topk,
        smooth_px / grid_stride,
        mask,
        parts,
        white,
        pixel_weight,
    )
