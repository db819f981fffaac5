"""Pretrained backbones used well: a probe on frozen features, or the head first, then all.

- ``model.freeze=true``: the backbone never trains. Its features of every training and
  validation layer are computed once (no augmentation: the pixels do not change), and only the
  1x1 head trains on them, so an epoch costs milliseconds (a linear probe; with mean pooling the
  head is a logistic regression on the mean feature, and it still gives the defect map).
- ``model.freeze_epochs=N``: epochs 1..N train the head on a frozen backbone (BatchNorm keeps its
  pretrained statistics), then the whole net trains, the backbone at
  ``optim.lr x optim.backbone_lr_scale``, so a random head does not wreck pretrained features.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from inspect3d.errors import InspectError
from inspect3d.models import LayerNet, has_pretrained_backbone
from inspect3d.models.device import autocast, to_memory_format

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FreezePlan:
    probe: bool = False  # model.freeze=true: the head alone, on features computed once
    head_epochs: int = 0  # model.freeze_epochs: epochs 1..N train the head alone
    backbone_lr_scale: float = 1.0

    def frozen_at(self, epoch: int) -> bool:
        return self.probe or epoch <= self.head_epochs


def freeze_plan(model_cfg: Any, optim_cfg: Any, epochs: int) -> FreezePlan:
    """The plan the config asks for; a frozen backbone without pretrained weights, both
    settings at once or ``freeze_epochs`` outside 0..epochs-1 are errors naming the fix."""
    freeze = bool(model_cfg.get("freeze", False))
    head_epochs = int(model_cfg.get("freeze_epochs", 0))
    name = model_cfg.get("name", "?")
    if (freeze or head_epochs) and not has_pretrained_backbone(
        name, model_cfg.get("pretrained", False)
    ):
        setting = "model.freeze=true" if freeze else f"model.freeze_epochs={head_epochs}"
        raise InspectError(
            f"{setting} needs a pretrained backbone, but model {name!r} "
            f"{'has none' if name == 'smallcnn' else 'is built with model.pretrained=false'} "
            "(random weights are not worth freezing): use model=efficientnet_lite0 (ImageNet "
            "weights, offline) or a torchvision model with model.pretrained=true, or drop "
            f"{setting.split('=')[0]}"
        )
    if freeze and head_epochs:
        raise InspectError(
            f"model.freeze=true trains only the head, so model.freeze_epochs={head_epochs} "
            "does not apply: use model.freeze=true alone (a probe) or model.freeze_epochs=N "
            "alone (head first, then the whole net)"
        )
    if not 0 <= head_epochs < epochs:
        raise InspectError(
            f"model.freeze_epochs={head_epochs} is not valid with trainer.epochs={epochs}: use "
            f"0..{epochs - 1} (the epochs after it train the whole net), or model.freeze=true "
            "to train the head alone"
        )
    scale = float(optim_cfg.get("backbone_lr_scale", 1.0))
    if scale < 0:
        raise InspectError(f"optim.backbone_lr_scale={scale!r} is not valid: use a value >= 0")
    return FreezePlan(probe=freeze, head_epochs=head_epochs, backbone_lr_scale=scale)


def optimizer_factory(optim_cfg: Any) -> tuple[Any, float]:
    """The optimiser constructor an ``optim`` node describes (a ``_partial_`` torch.optim class
    taking the parameters) and its ``backbone_lr_scale`` (not an optimiser argument)."""
    cfg = OmegaConf.to_container(optim_cfg) if OmegaConf.is_config(optim_cfg) else dict(optim_cfg)
    scale = float(cfg.pop("backbone_lr_scale", 1.0))
    return instantiate(cfg), scale


def make_optimizer(optim_cfg: Any, net: LayerNet, backbone_lr_scale: float):
    """``optim`` over two parameter groups: the head and the rest first (group 0, whose lr is
    logged), then the backbone at ``optim.lr x backbone_lr_scale``."""
    ctor, _ = optimizer_factory(optim_cfg)
    backbone = {id(p) for p in net.backbone.parameters()}
    rest = [p for p in net.parameters() if id(p) not in backbone]
    groups = [{"params": rest}]
    if backbone:
        lr = float(optim_cfg["lr"]) * backbone_lr_scale
        groups.append({"params": list(net.backbone.parameters()), "lr": lr})
    return ctor(groups)


class FeatureSet(torch.utils.data.Dataset):
    """A LayerDataset's labels and masks with backbone features in place of the pixels."""

    def __init__(self, features: torch.Tensor, layers) -> None:
        self.images = features
        self.labels, self.masks, self.known = layers.labels, layers.masks, layers.known

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return self.images[i], self.labels[i], self.masks[i], self.known[i]


@torch.inference_mode()
def feature_dataset(
    net: LayerNet, dataset, device: torch.device, amp: bool, batch_size: int = 16
) -> FeatureSet:
    """(features float16, label, mask, known) of every layer of a LayerDataset, computed once
    by the frozen backbone (in eval mode: pretrained BatchNorm statistics)."""
    was_training = net.training
    net.eval()
    feats = []
    for start in range(0, len(dataset), batch_size):
        x = dataset.images[start : start + batch_size]
        with autocast(device, amp):
            f = net.features(to_memory_format(x.to(device)))
        feats.append(f.float().half().cpu())
    net.train(was_training)
    f = torch.cat(feats) if feats else torch.empty(0)
    log.info(
        "probe: backbone features of %d layers computed once (%s per layer, %.0f MB)",
        len(dataset),
        "x".join(str(s) for s in f.shape[1:]),
        f.numel() * 2 / 2**20,
    )
    return FeatureSet(f, dataset)
