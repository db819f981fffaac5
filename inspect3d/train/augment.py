"""Training augmentation for what changes between cameras and printers (torch, batch-wise).

Every layer of a training batch gets random flips, and each of the following with probability
``AugmentSettings.p``, at a strength drawn uniformly up to its setting (0 turns it off):

- geometry, one homography per layer applied to the layer and its mask alike: zoom
  (``scale``: factor in [1/(1+s), 1+s]), crop offset (``crop``: up to that fraction of the
  size), rotation (``rotate``, degrees) and perspective (``perspective``: corners moved by up to
  that fraction), resampled bilinearly with reflected borders;
- optics: Gaussian blur (``blur``: sigma up to that many pixels), sensor noise (``noise``: sigma
  up to that many grey levels);
- framing (``inset``, off by default; for FDM photos): the layer shrunk by a factor in
  [1 - inset, 1] and set at a random place into another layer of the batch that is normal
  (label 0), keeping its own label and its mask moved with it: the part small in a wider view;
- light and colour: gamma (``gamma``: exponent in [1/(1+g), 1+g]), brightness and contrast
  (``jitter``, a fraction), and on colour layers white balance (``white_balance``: a gain per
  channel of 1 +- that) and saturation (``colour``: 1 +- that).

All random numbers come from the CPU generator passed in, so one seed gives the same batches on
CPU and GPU. Only training batches pass through here; validation, eval, export and scoring see
the layers as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

from inspect3d.config import AugmentConfig
from inspect3d.errors import InspectError

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights: grey of an RGB layer


@dataclass
class AugmentSettings(AugmentConfig):
    """``data.augment`` (camera shift) with the flips and jitter of ``data`` (off unless set)."""

    hflip: bool = False
    vflip: bool = False
    jitter: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                continue
            where = "data" if f.name == "jitter" else "data.augment"
            if value < 0 or (f.name == "p" and value > 1):
                valid = "a probability in [0, 1]" if f.name == "p" else "a value >= 0 (0: off)"
                raise InspectError(f"{where}.{f.name}={value!r} is not valid: use {valid}")
        if self.inset >= 1:
            raise InspectError(
                f"data.augment.inset={self.inset} would shrink layers to nothing: use a value "
                "in [0, 1) (0.6: down to 40% of the side)"
            )
        if self.scale >= 1 or self.crop >= 0.5 or self.perspective >= 0.5:
            raise InspectError(
                f"data.augment scale={self.scale}, crop={self.crop}, "
                f"perspective={self.perspective} would warp the layer out of view: use scale < "
                "1, crop < 0.5 and perspective < 0.5 (defaults 0.1, 0.05, 0.03)"
            )


def augment_settings(data: Any) -> AugmentSettings:
    """The settings of a data config: flips and jitter from ``data``, the rest from
    ``data.augment``."""
    camera = dict(data.augment) if data.get("augment") is not None else {}
    return AugmentSettings(hflip=data.hflip, vflip=data.vflip, jitter=data.jitter, **camera)


def augment(
    x: torch.Tensor,
    mask: torch.Tensor,
    settings: AugmentSettings,
    gen: torch.Generator,
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """An augmented copy of a uint8/float batch (N, C, H, W) and its masks (N, 1, h, w);
    returns float pixels in 0..255 and masks of the input's dtype. ``labels`` (N,): which
    layers are normal (0), the backgrounds of ``inset``; without them no inset."""
    s = settings
    x, mask = flips(x.float(), mask.clone(), s, gen)
    x, mask = warp(x, mask, s, gen)
    if labels is not None:
        x, mask = inset(x, mask, labels, s, gen)
    x = blur(x, _strength(x, s.blur, s.p, gen))
    x = white_balance_and_saturation(x, s, gen)
    x = gamma(x, _strength(x, math.log1p(s.gamma), s.p, gen, signed=True))
    x = brightness_contrast(x, s.jitter, gen)
    x = noise(x, _strength(x, s.noise, s.p, gen), gen)
    return x.clamp_(0, 255), mask


def _uniform(n: int, gen: torch.Generator, signed: bool = False) -> torch.Tensor:
    u = torch.rand(n, generator=gen)
    return u * 2 - 1 if signed else u


def _strength(
    x: torch.Tensor, limit: float, p: float, gen: torch.Generator, signed: bool = False
) -> torch.Tensor:
    """Per layer: a strength drawn up to ``limit`` for a random share ``p`` of them, else 0."""
    n = x.shape[0]
    on = torch.rand(n, generator=gen) < p
    return (_uniform(n, gen, signed) * limit * on).to(x.device)


def flips(x, mask, s: AugmentSettings, gen: torch.Generator):
    n = x.shape[0]
    for enabled, dim in ((s.hflip, -1), (s.vflip, -2)):
        if enabled:
            flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
            x[flip] = x[flip].flip(dim)
            mask[flip] = mask[flip].flip(dim)
    return x, mask


def homographies(n: int, s: AugmentSettings, gen: torch.Generator) -> torch.Tensor:
    """(N, 3, 3) maps from output to input coordinates in [-1, 1] (identity where a layer
    draws no warp): zoom, rotation, crop offset, then perspective."""
    on = (torch.rand(n, generator=gen) < s.p).float()
    zoom = torch.exp(_uniform(n, gen, True) * math.log1p(s.scale) * on)
    angle = _uniform(n, gen, True) * math.radians(s.rotate) * on
    shift = _uniform(2 * n, gen, True).view(n, 2) * 2 * s.crop * on[:, None]
    tilt = _uniform(2 * n, gen, True).view(n, 2) * 2 * s.perspective * on[:, None]
    h = torch.zeros(n, 3, 3)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    h[:, 0, 0], h[:, 0, 1], h[:, 0, 2] = cos, -sin, shift[:, 0]
    h[:, 1, 0], h[:, 1, 1], h[:, 1, 2] = sin, cos, shift[:, 1]
    h[:, 2, 0], h[:, 2, 1], h[:, 2, 2] = tilt[:, 0], tilt[:, 1], 1.0
    return h


def _grid(h: torch.Tensor, height: int, width: int, device: torch.device) -> torch.Tensor:
    ys = torch.linspace(-1, 1, height, device=device)
    xs = torch.linspace(-1, 1, width, device=device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack([gx, gy, torch.ones_like(gx)], -1).view(1, -1, 3)
    mapped = points @ h.to(device).transpose(1, 2)
    return (mapped[..., :2] / mapped[..., 2:].clamp_min(1e-3)).view(-1, height, width, 2)


def warp(x, mask, s: AugmentSettings, gen: torch.Generator):
    """One random homography per layer, applied to layer (bilinear) and mask (nearest)."""
    if not any((s.scale, s.crop, s.rotate, s.perspective)) or s.p == 0:
        return x, mask
    h = homographies(x.shape[0], s, gen)
    moved = ~torch.isclose(h, torch.eye(3).expand_as(h)).flatten(1).all(1)
    if not bool(moved.any()):
        return x, mask
    idx = moved.nonzero()[:, 0].to(x.device)
    hm = h[moved]
    grid = _grid(hm, x.shape[-2], x.shape[-1], x.device)
    x = x.clone()
    x[idx] = F.grid_sample(x[idx], grid, "bilinear", "reflection", align_corners=True)
    mgrid = _grid(hm, mask.shape[-2], mask.shape[-1], x.device)
    m = F.grid_sample(mask[idx].float(), mgrid, "nearest", "reflection", align_corners=True)
    mask[idx] = m.to(mask.dtype)
    return x, mask


def inset(x, mask, labels: torch.Tensor, s: AugmentSettings, gen: torch.Generator):
    """A share ``p`` of the layers shrunk by a factor in [1 - s.inset, 1] into a normal layer
    of the batch (another one), at a random place; masks alike, zero around the inset."""
    normal = (labels.cpu() == 0).nonzero()[:, 0]
    if s.inset <= 0 or s.p == 0 or len(normal) == 0:
        return x, mask
    src_x, src_m = x, mask  # read from; the insets are written into copies
    x, mask = x.clone(), mask.clone()
    height, width = x.shape[-2:]
    for i in range(x.shape[0]):
        others = normal[normal != i]
        if len(others) == 0 or float(torch.rand(1, generator=gen)) >= s.p:
            continue
        b = int(others[torch.randint(len(others), (1,), generator=gen)])
        f = 1 - s.inset * float(torch.rand(1, generator=gen))
        h, w = max(1, round(height * f)), max(1, round(width * f))
        top = int(torch.randint(height - h + 1, (1,), generator=gen))
        left = int(torch.randint(width - w + 1, (1,), generator=gen))
        x[i] = src_x[b]
        x[i, :, top : top + h, left : left + w] = F.interpolate(
            src_x[i : i + 1], (h, w), mode="bilinear", antialias=True, align_corners=False
        )[0]
        mask[i] = _inset_mask(src_m[i], (top / height, left / width), f)
    return x, mask


def _inset_mask(m: torch.Tensor, corner: tuple[float, float], f: float) -> torch.Tensor:
    """Mask (1, h, w) shrunk by ``f`` with its top-left corner at ``corner`` (fractions)."""
    mh, mw = m.shape[-2:]
    h, w = max(1, round(mh * f)), max(1, round(mw * f))
    top, left = min(round(corner[0] * mh), mh - h), min(round(corner[1] * mw), mw - w)
    out = torch.zeros_like(m)
    small = F.adaptive_max_pool2d(m[None].float(), (h, w))[0]
    out[:, top : top + h, left : left + w] = small.to(m.dtype)
    return out


def blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per layer (0: unchanged)."""
    if not bool((sigma > 0).any()):
        return x
    n, c, hgt, wid = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    k = torch.where(sigma[:, None] > 0, k, (t[None] == 0).to(x.dtype))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N*C, K)
    y = x.reshape(1, n * c, hgt, wid)
    y = F.conv2d(
        F.pad(y, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=n * c
    )
    y = F.conv2d(
        F.pad(y, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=n * c
    )
    return y.view(n, c, hgt, wid)


def white_balance_and_saturation(x: torch.Tensor, s: AugmentSettings, gen: torch.Generator):
    """Colour layers only: a gain per channel, then saturation about the layer's grey."""
    if x.shape[1] != 3 or not (s.white_balance or s.colour):
        return x
    n = x.shape[0]
    on = (torch.rand(n, generator=gen) < s.p).float()[:, None]
    gains = 1 + _uniform(3 * n, gen, True).view(n, 3) * s.white_balance * on
    x = x * gains.to(x.device)[:, :, None, None]
    sat = (1 + _uniform(n, gen, True) * s.colour * on[:, 0]).to(x.device)[:, None, None, None]
    luma = torch.tensor(LUMA, device=x.device, dtype=x.dtype)[None, :, None, None]
    grey = (x * luma).sum(1, keepdim=True)
    return grey + (x - grey) * sat


def gamma(x: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """Pixels (0..255) as x^exp(strength) in units of 255: a camera's tone curve."""
    if not bool((strength != 0).any()):
        return x
    g = torch.exp(strength)[:, None, None, None]
    return 255.0 * (x.clamp(0, 255) / 255.0) ** g


def brightness_contrast(x: torch.Tensor, jitter: float, gen: torch.Generator) -> torch.Tensor:
    """Contrast about the layer mean by 1 +- jitter, brightness by +- jitter x 128 levels."""
    if jitter <= 0:
        return x
    shape = (x.shape[0], 1, 1, 1)
    contrast = (1 + (torch.rand(shape, generator=gen) * 2 - 1) * jitter).to(x.device)
    brightness = ((torch.rand(shape, generator=gen) * 2 - 1) * jitter * 128).to(x.device)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean + brightness).clamp_(0, 255)


def noise(x: torch.Tensor, sigma: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Gaussian sensor noise, one sigma (grey levels) per layer."""
    if not bool((sigma > 0).any()):
        return x
    z = torch.randn(x.shape, generator=gen).to(x.device)
    return x + z * sigma[:, None, None, None]
