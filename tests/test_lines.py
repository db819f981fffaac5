"""Line features: thin long streaks stand out of powder, parts and short marks; stride-8 only;
exported graphs give the same numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inspect3d.data.preprocess import Preprocess
from inspect3d.errors import InspectError
from inspect3d.models import ScoringNet, build_model
from inspect3d.models.lines import LineFeatures

SIZE = 256


def powder(seed: int = 0) -> np.ndarray:
    """Grainy powder with a slow gradient, a bright-rimmed square part and short marks."""
    rng = np.random.default_rng(seed)
    img = 120 + 10 * rng.standard_normal((SIZE, SIZE)) + np.linspace(-20, 20, SIZE)[None, :]
    img[60:110, 150:200] += 15  # a part, its outline a thin bright rim 50 px long
    img[60:110, [150, 199]] += 40
    img[[60, 109], 150:200] += 40
    for x, y in rng.integers(20, SIZE - 40, size=(6, 2)):  # grains dragged a few px
        img[y : y + 12, x] += 30
    return img


def strength(img: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        out = LineFeatures()(torch.from_numpy(img.astype(np.float32))[None, None])
    return out[0].amax(0).numpy()  # strongest line per 8 x 8 cell


@pytest.mark.parametrize("vertical,amp,width", [(True, 10, 1), (False, -10, 2), (True, -8, 3)])
def test_a_faint_streak_is_the_strongest_line(vertical: bool, amp: float, width: int) -> None:
    img = powder()
    if vertical:
        img[30:230, 90 : 90 + width] += amp  # 200 px long, a few grey levels, below the grain
    else:
        img[170 : 170 + width, 20:240] += amp
    s = strength(img)
    cells = np.zeros_like(s, dtype=bool)
    if vertical:
        cells[5:28, 90 // 8 : (90 + width - 1) // 8 + 1] = True
    else:
        cells[170 // 8 : (170 + width - 1) // 8 + 1, 4:29] = True
    assert s[cells].max() > 1.5 * s[~cells].max()  # the streak, not the rim or the marks
    assert strength(powder())[cells].max() < 0.6 * s[cells].max()  # nothing there without it


def test_exposure_and_contrast_do_not_move_it() -> None:
    img = powder()
    img[30:230, 90] += 10
    assert np.allclose(strength(img), strength(1.6 * img + 25), atol=1e-3)


def test_only_stride_8_models_take_line_features() -> None:
    pre = Preprocess(height=64, width=64)
    with pytest.raises(InspectError, match=r"model.lines=true needs a stride-8 model.*stride 16"):
        build_model("smallcnn", 2, pre, lines=True)
    with pytest.raises(InspectError, match=r"'resnet18'.*model=efficientnet_lite0_s8"):
        build_model("resnet18", 2, pre, lines=True)
    net = build_model("smallcnn", 2, pre, stride=8, lines=True)
    logits, logit_map = net(torch.zeros(1, 1, 64, 64, dtype=torch.uint8))
    plain = build_model("smallcnn", 2, pre, stride=8).head.in_channels
    assert logit_map.shape == (1, 2, 8, 8) and net.head.in_channels == plain + 4


def test_exported_graph_matches_torch(tmp_path) -> None:
    from inspect3d.export.onnx import _torch_export, verify

    pre = Preprocess(height=96, width=128)
    net = ScoringNet(build_model("smallcnn", 2, pre, stride=8, lines=True).eval())
    rng = np.random.default_rng(1)
    layers = rng.integers(0, 256, size=(2, 1, 96, 128), dtype=np.uint8)
    layers[:, :, 5:90, 40] = 255
    path = tmp_path / "lines.onnx"
    _torch_export(net, layers, path, 18)
    verify(net, path, layers, 1e-4)  # raises when onnxruntime's numbers differ from torch's
