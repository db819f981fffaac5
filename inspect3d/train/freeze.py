"""Pretrained backbones used well: a probe on frozen features, or the head first, then all.

- ``model.freeze=true``: the backbone never trains. Its features of every training and
  validation layer are computed once, and only the 1x1 head trains on them, so an epoch costs
  milliseconds (a linear probe; with mean pooling the head is a logistic regression on the mean
  feature, and it still gives the defect map). ``model.probe_views=K``: the training layers'
  features are computed for K views of each, the layer as it is and K-1 copies augmented with
  ``data.augment`` (camera shift), so the head learns across cameras too; validation layers are
  read as they are.
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
from inspect3d.train.augment import AugmentSettings, augment

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FreezePlan:
    probe: bool = False  # model.freeze=true: the head alone, on features computed once
    head_epochs: int = 0  # model.freeze_epochs: epochs 1..N train the head alone
    backbone_lr_scale: float = 1.0
    views: int = 1  # model.probe_views: training features of this many views per layer

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
    views = probe_views(model_cfg, freeze)
    return FreezePlan(freeze, head_epochs, scale, views)


def probe_views(model_cfg: Any, freeze: bool) -> int:
    """``model.probe_views``: an integer >= 1, and above 1 only for a probe."""
    views = model_cfg.get("probe_views", 1)
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise InspectError(
            f"model.probe_views={views!r} is not valid: use an integer >= 1 (1: the layers as "
            "they are; K: K-1 augmented copies too)"
        )
    if views > 1 and not freeze:
        raise InspectError(
            f"model.probe_views={views} applies to a probe (model.freeze=true), whose features "
            "are computed once; a backbone that trains sees augmented layers every epoch: "
            "drop model.probe_views or set model.freeze=true"
        )
    return views


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


FEATURE_BATCH = 16  # layers per backbone call while features are computed


@dataclass(frozen=True)
class Views:
    """How a probe's training features are computed: ``n`` views of each layer, the first as
    it is, the others augmented with ``settings`` from ``gen``."""

    n: int
    settings: AugmentSettings
    gen: torch.Generator


class FeatureSet(torch.utils.data.Dataset):
    """A LayerDataset's labels and masks with backbone features in place of the pixels (``views``
    per layer: the features are the views one after the other, each over all layers)."""

    def __init__(self, features: torch.Tensor, layers, views: int, masks: torch.Tensor) -> None:
        self.images, self.masks = features, masks
        self.labels, self.known = layers.labels.repeat(views), layers.known.repeat(views)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return self.images[i], self.labels[i], self.masks[i], self.known[i]


@torch.inference_mode()
def feature_dataset(
    net: LayerNet, dataset, device: torch.device, amp: bool, views: Views | None = None
) -> FeatureSet:
    """(features float16, label, mask, known) of every layer of a LayerDataset, computed once
    by the frozen backbone (in eval mode: pretrained BatchNorm statistics); with ``views``, of
    the layers as they are and of ``views.n - 1`` augmented copies of each (their masks warped
    alike)."""
    was_training = net.training
    net.eval()
    n_views = 1 if views is None else views.n
    feats, masks = [], []
    for view in range(n_views):
        # augmented views go in a shuffled order: an inset needs normal layers in its batch
        order = (
            torch.arange(len(dataset))
            if view == 0
            else torch.randperm(len(dataset), generator=views.gen)
        )
        f_view, m_view = _view_features(net, dataset, order, views if view else None, device, amp)
        feats.append(f_view)
        masks.append(m_view)
    net.train(was_training)
    f = torch.cat(feats)
    log.info(
        "probe: backbone features of %d layers x %d view(s) computed once (%s per layer, %.0f MB)",
        len(dataset),
        n_views,
        "x".join(str(s) for s in f.shape[1:]),
        f.numel() * 2 / 2**20,
    )
    return FeatureSet(f, dataset, n_views, torch.cat(masks))


def _view_features(net, dataset, order: torch.Tensor, views: Views | None, device, amp: bool):
    """Features and masks of one view of every layer, computed in batches taken in ``order``
    and returned in the dataset's order; augmented with ``views`` (None: as they are)."""
    feats, masks = [None] * len(dataset), [None] * len(dataset)
    for start in range(0, len(order), FEATURE_BATCH):
        idx = order[start : start + FEATURE_BATCH]
        x, m = dataset.images[idx], dataset.masks[idx]
        if views is not None:
            x, m = augment(x, m, views.settings, views.gen, dataset.labels[idx])
        with autocast(device, amp):
            f = net.features(to_memory_format(x.to(device))).float().half().cpu()
        for j, i in enumerate(idx.tolist()):
            feats[i], masks[i] = f[j], m[j]
    if not feats:
        return torch.empty(0), dataset.masks[:0]
    return torch.stack(feats), torch.stack(masks)
