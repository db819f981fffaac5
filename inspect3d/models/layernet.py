"""The network shape shared by every backbone: normalise -> features -> class map -> pooling.

A 1x1 convolution turns backbone features into a map of class logits (one vector per cell of
the layer); pooling turns that map into per-layer logits. The same map, as 1 - P(normal) per
cell, is the coarse defect map. Pooling is log-sum-exp with sharpness ``pool_r``: 0 is the mean
(class-activation maps; trains fastest), larger values move towards the max, so a defect
covering few cells weighs more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class InputSpec:
    """What a network knows of its input: the channels, and the numbers of step 2 of the
    preprocessing (``inspect3d.data.preprocess``): ``norm`` per_image, or fixed ``mean`` and
    ``std`` as fractions of 255. Input sizes and file decoding stay with the data stage."""

    channels: int = 1
    norm: str = "per_image"
    mean: float = 0.5
    std: float = 0.25

    @classmethod
    def of(cls, source: Any) -> InputSpec:
        """The spec of anything with these four attributes (a ``Preprocess``, a spec)."""
        return cls(source.channels, source.norm, float(source.mean), float(source.std))


class Normalize(nn.Module):
    """Step 2 of the preprocessing (see inspect3d.data.preprocess), inside the graph.

    ``spec``: an ``InputSpec``, or anything with its ``norm``, ``mean`` and ``std``."""

    def __init__(self, spec: InputSpec) -> None:
        super().__init__()
        self.per_image = spec.norm == "per_image"
        self.register_buffer("mean", torch.tensor(spec.mean * 255.0), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std * 255.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if not self.per_image:
            return (x - self.mean) / self.std
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = ((x - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
        return (x - mean) / (std + 1.0)  # +1 grey level keeps flat images finite


class LayerNet(nn.Module):
    """uint8/float (N, C, H, W) pixels -> (layer logits (N, K), logit map (N, K, h, w))."""

    def __init__(
        self,
        backbone: nn.Module,
        feature_channels: int,
        num_classes: int,
        spec: InputSpec,
        pool_r: float = 0.0,
        dropout: float = 0.1,
        head_hidden: int = 0,
    ) -> None:
        super().__init__()
        self.normalize = Normalize(spec)
        self.backbone = backbone
        self.dropout = nn.Dropout2d(dropout)
        self.head = class_head(feature_channels, num_classes, head_hidden)
        self.pool_r = pool_r

        self.pretrained_backbone = False  # set by build_model: ImageNet weights were loaded
        self.backbone_frozen = False

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features of pixels (N, C, H, W): what the head reads."""
        return self.backbone(self.normalize(x))

    def classify(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Head and pooling: features -> (layer logits (N, K), logit map (N, K, h, w))."""
        logit_map = self.head(self.dropout(features))
        flat = logit_map.flatten(2)
        if self.pool_r <= 0:
            return flat.mean(dim=2), logit_map
        pooled = torch.logsumexp(flat * self.pool_r, dim=2) - math.log(flat.shape[2])
        return pooled / self.pool_r, logit_map

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.classify(self.features(x))

    def freeze_backbone(self, frozen: bool = True) -> None:
        """Stop (or restart) training the backbone: no gradients, and its BatchNorm statistics
        stay those of the pretrained weights (the backbone stays in eval mode while frozen)."""
        self.backbone_frozen = frozen
        for p in self.backbone.parameters():
            p.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> LayerNet:
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self


def class_head(feature_channels: int, num_classes: int, hidden: int = 0) -> nn.Module:
    """Features -> class logits per cell: a 1x1 convolution, or with ``hidden`` > 0 two of them
    with a ReLU between (a small per-cell MLP: it can learn a defect that lies on both sides of
    the powder's features, darker or brighter, which one weighted sum cannot)."""
    if hidden <= 0:
        return nn.Conv2d(feature_channels, num_classes, kernel_size=1)
    return nn.Sequential(
        nn.Conv2d(feature_channels, hidden, kernel_size=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, num_classes, kernel_size=1),
    )


class HeadNet(nn.Module):
    """The head of a LayerNet on features computed once (a probe on a frozen backbone): the
    same parameters, so training it trains the LayerNet's head."""

    def __init__(self, net: LayerNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.classify(features.float())  # cached as float16


class ScoringNet(nn.Module):
    """What gets exported: class probabilities and a defect map of shape (N, 1, h, w), in [0, 1]
    for a supervised net (1 - P(normal) per cell); a net with a ``scoring`` method gives its own
    (a normal-only model: the map in units of its threshold)."""

    def __init__(self, net: LayerNet, normal_index: int = 0) -> None:
        super().__init__()
        self.net = net
        self.normal_index = normal_index

    def forward(
        self, x: torch.Tensor, part_cells: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if hasattr(self.net, "scoring"):  # a net with its own exported outputs (normal-only)
            return self.net.scoring(x, part_cells)
        logits, logit_map = self.net(x)
        probs = torch.softmax(logits, dim=1)
        normal = torch.softmax(logit_map, dim=1)[:, self.normal_index : self.normal_index + 1]
        return probs, 1.0 - normal
