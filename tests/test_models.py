"""Every model: forward and backward without NaN, grey and colour, with a defect map."""

from __future__ import annotations

import pytest
import torch

from inspect3d.data.preprocess import Preprocess
from inspect3d.errors import InspectError
from inspect3d.models import MODEL_NAMES, ScoringNet, build_model


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_backward_finite(name, channels):
    torch.manual_seed(0)
    pre = Preprocess(height=96, width=128, channels=channels)
    net = build_model(name, num_classes=4, spec=pre)
    x = torch.randint(0, 256, (2, channels, 96, 128), dtype=torch.uint8)
    logits, logit_map = net(x)
    assert logits.shape == (2, 4) and logit_map.shape[:2] == (2, 4)
    logits.sum().backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    net.eval()
    probs, defect_map = ScoringNet(net)(x)
    assert torch.allclose(probs.sum(1), torch.ones(2), atol=1e-5)
    assert defect_map.shape[1] == 1 and defect_map.min() >= 0 and defect_map.max() <= 1


def test_flat_layer_stays_finite():
    net = build_model("smallcnn", 2, Preprocess(height=64, width=64)).eval()
    logits, _ = net(torch.full((1, 1, 64, 64), 128, dtype=torch.uint8))
    assert torch.isfinite(logits).all()


def test_per_image_normalisation_ignores_brightness_and_contrast():
    """PBLM's classes differ in brightness: per_image input must not see it."""
    torch.manual_seed(0)
    net = build_model("smallcnn", 3, Preprocess(height=64, width=64, norm="per_image")).eval()
    x = torch.rand(1, 1, 64, 64) * 100 + 50
    with torch.no_grad():
        a, _ = net(x)
        b, _ = net(x * 1.5 + 20)
    assert torch.allclose(a, b, atol=1e-3)


def test_grey_stem_of_a_pretrained_layout_sums_rgb():
    net = build_model("resnet18", 2, Preprocess(height=64, width=64, channels=1))
    assert net.backbone[0].weight.shape[1] == 1


def test_unknown_model_is_named():
    with pytest.raises(InspectError, match=r"unknown model 'vgg'.*smallcnn"):
        build_model("vgg", 2, Preprocess())


@pytest.mark.parametrize("stride", [8, 16])
def test_smallcnn_map_stride(stride):
    net = build_model("smallcnn", 3, Preprocess(height=128, width=96), width=4, stride=stride)
    _, logit_map = net(torch.zeros(1, 1, 128, 96, dtype=torch.uint8))
    assert tuple(logit_map.shape[-2:]) == (128 // stride, 96 // stride)


def test_bad_stride_is_named():
    with pytest.raises(InspectError, match=r"model.stride=4 is not valid for smallcnn: use 8"):
        build_model("smallcnn", 2, Preprocess(), stride=4)
    with pytest.raises(InspectError, match=r"model.stride=8 applies to smallcnn only"):
        build_model("resnet18", 2, Preprocess(), stride=8)


REDUCED_AVX512_CASE = """
import torch
from inspect3d.data.preprocess import Preprocess
from inspect3d.models import build_model
from inspect3d.models.device import memory_format, to_memory_format
torch.manual_seed(0)
pre = Preprocess(height=128, width=128, channels=1)
cpu = memory_format(torch.device("cpu"))
for width in (4, 8, 16):
    net = build_model("smallcnn", 2, pre, width=width).to(memory_format=cpu)
    x = to_memory_format(torch.randint(0, 256, (4, 1, 128, 128), dtype=torch.uint8))
    net(x)[0].sum().backward()
print("ok")
"""


def test_training_memory_format_survives_narrow_backward_on_this_cpu():
    """The reduced case that crashed oneDNN on AVX-512 CPUs (SIGSEGV in the backward of a narrow
    channels_last SmallCNN at 128 px): training's CPU memory format must run it. In a
    subprocess, so a crash fails this test instead of killing the run."""
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", REDUCED_AVX512_CASE], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])
