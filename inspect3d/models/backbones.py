"""torchvision backbones adapted to grey (1-channel) or colour layers, as feature extractors."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision import models as tvm

from inspect3d.errors import InspectError

# name -> (constructor, weights enum, feature channels)
_TORCHVISION: dict[str, tuple[Callable[..., nn.Module], object, int]] = {
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.DEFAULT, 512),
    "mobilenet_v3_small": (tvm.mobilenet_v3_small, tvm.MobileNet_V3_Small_Weights.DEFAULT, 576),
    "mobilenet_v3_large": (tvm.mobilenet_v3_large, tvm.MobileNet_V3_Large_Weights.DEFAULT, 960),
    "efficientnet_b0": (tvm.efficientnet_b0, tvm.EfficientNet_B0_Weights.DEFAULT, 1280),
}
TORCHVISION_BACKBONES = tuple(_TORCHVISION)


def torchvision_backbone(name: str, in_chans: int, pretrained: bool) -> tuple[nn.Module, int]:
    """Feature extractor (output stride 32) and its channel count."""
    ctor, weights, channels = _TORCHVISION[name]
    model = ctor(weights=_load_weights(name, weights) if pretrained else None)
    features = _features(name, model)
    _adapt_first_conv(features, in_chans)
    return features, channels


def _load_weights(name: str, weights: object) -> object:
    try:
        weights.get_state_dict(progress=True)  # fetch now, so failure is reported here
    except Exception as exc:  # network or cache problems: say what to do
        raise InspectError(
            f"cannot load pretrained ImageNet weights for {name!r} ({exc.__class__.__name__}: "
            f"{exc}); on a machine without internet use model.pretrained=false, or copy the "
            f"weight file into the torch hub cache ({torch.hub.get_dir()}/checkpoints)"
        ) from exc
    return weights


def _features(name: str, model: nn.Module) -> nn.Module:
    if name.startswith("resnet"):
        return nn.Sequential(*list(model.children())[:-2])  # drop avgpool + fc
    return model.features


def _first_conv(features: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    for parent in features.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                return parent, child_name, child
    raise RuntimeError("backbone has no convolution")


def _adapt_first_conv(features: nn.Module, in_chans: int) -> None:
    """Swap the RGB stem for ``in_chans`` inputs; grey weights are the sum of the RGB ones."""
    if in_chans == 3:
        return
    parent, child_name, conv = _first_conv(features)
    new = nn.Conv2d(
        in_chans,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight.sum(dim=1, keepdim=True).repeat(1, in_chans, 1, 1) / in_chans)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    setattr(parent, child_name, new)
