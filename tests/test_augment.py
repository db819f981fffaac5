"""Training augmentation for camera and printer shift: ranges, masks, seeds, config, eval."""

from __future__ import annotations

import pytest
import torch

from inspect3d.config import AugmentConfig
from inspect3d.errors import InspectError
from inspect3d.train.augment import AugmentSettings, augment, augment_settings

from conftest import compose

OFF = {f: 0.0 for f in AugmentConfig.__dataclass_fields__}


def only(**on) -> AugmentSettings:
    """Every camera-shift setting off but ``on``, applied to every layer (p = 1)."""
    return AugmentSettings(**{**OFF, "p": 1.0, **on})


def run(x, settings, seed=0, mask=None):
    mask = torch.zeros(x.shape[0], 1, x.shape[2] // 4, x.shape[3] // 4) if mask is None else mask
    return augment(x, mask, settings, torch.Generator().manual_seed(seed))


def ramp(n=16, c=1, size=64) -> torch.Tensor:
    row = torch.linspace(10, 245, size)
    return row.expand(n, c, size, size).clone()


def test_all_off_is_the_identity():
    x = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    y, _ = run(x, AugmentSettings(**OFF))
    assert torch.equal(y, x.float())


def test_gamma_stays_in_its_range():
    x = ramp()
    y, _ = run(x, only(gamma=0.3))
    v = x[:, 0, 0, 1:-1] / 255
    g = (torch.log(y[:, 0, 0, 1:-1] / 255) / torch.log(v)).mean(1)
    assert (g >= 1 / 1.3 - 1e-3).all() and (g <= 1.3 + 1e-3).all()
    assert (g - 1).abs().max() > 0.05  # it did something


def test_brightness_shift_and_contrast_stay_in_range():
    x = 128 + 10 * torch.randn(32, 1, 32, 32)
    y, _ = run(x, AugmentSettings(**OFF, jitter=0.2))
    shift = (y.mean((1, 2, 3)) - x.mean((1, 2, 3))).abs()
    ratio = y.std((1, 2, 3)) / x.std((1, 2, 3))
    assert shift.max() <= 0.2 * 128 + 1e-3 and shift.max() > 5
    assert (ratio >= 0.8 - 1e-3).all() and (ratio <= 1.2 + 1e-3).all()


def test_noise_sigma_stays_below_its_setting():
    x = torch.full((16, 1, 64, 64), 128.0)
    y, _ = run(x, only(noise=4.0))
    sd = (y - x).std((1, 2, 3))
    assert sd.max() <= 4.0 * 1.05 and sd.max() > 1.0


def test_blur_sigma_stays_below_its_setting():
    x = torch.zeros(16, 1, 33, 33)
    x[:, :, 16, 16] = 255.0
    y, _ = run(x, only(blur=1.0))
    w = y[:, 0] / y[:, 0].sum((1, 2), keepdim=True)
    t = torch.arange(33.0) - 16
    sigma = (w.sum(1) * t**2).sum(1).sqrt()  # second moment along x
    assert sigma.max() <= 1.0 + 1e-3 and sigma.max() > 0.3
    assert torch.allclose(y.sum((1, 2, 3)), x.sum((1, 2, 3)), rtol=1e-4)


def test_white_balance_gain_per_channel_stays_in_range():
    x = torch.full((16, 3, 16, 16), 100.0)
    y, _ = run(x, only(white_balance=0.1))
    gain = y.mean((2, 3)) / 100
    assert (
        (gain >= 0.9 - 1e-4).all() and (gain <= 1.1 + 1e-4).all() and (gain - 1).abs().max() > 0.02
    )


def test_saturation_leaves_grey_layers_alone():
    x = torch.randint(0, 256, (4, 1, 32, 32)).float()
    y, _ = run(x, only(colour=0.5, white_balance=0.5))
    assert torch.equal(y, x)


def square(n: int, size: int) -> torch.Tensor:
    x = torch.zeros(n, 1, size, size)
    q = size // 4
    x[:, :, q : size - q, q : size - q] = 255.0
    return x


def test_zoom_scales_the_area_in_range_and_moves_the_mask_alike():
    x, mask = square(16, 128), square(16, 32) / 255
    y, m = run(x, only(scale=0.2), mask=mask)
    area = (y > 127).float().mean((1, 2, 3)) / (x > 127).float().mean((1, 2, 3))
    assert (area >= 1 / 1.2**2 - 0.05).all() and (area <= 1.2**2 + 0.05).all()
    assert (area - 1).abs().max() > 0.05
    small = torch.nn.functional.avg_pool2d(y, 4) > 127
    iou = (small & (m > 0)).sum((1, 2, 3)) / (small | (m > 0)).sum((1, 2, 3))
    assert iou.min() > 0.85


def test_inset_sets_a_shrunk_layer_into_a_normal_one_with_its_mask():
    # layer 0: a bright defect layer with a mask everywhere; layers 1-3: dark normal ones
    x = torch.full((4, 1, 64, 64), 20.0)
    x[0] = 230.0
    mask = torch.zeros(4, 1, 16, 16, dtype=torch.uint8)
    mask[0] = 1
    labels = torch.tensor([1, 0, 0, 0])
    y, m = augment(x, mask, only(inset=0.5), torch.Generator().manual_seed(3), labels)
    bright = (y[0] > 127).float().mean()  # the defect layer now covers part of the view
    assert 0.25 - 0.05 <= bright <= 0.75 and (y[0] < 30).any()  # in a normal layer's pixels
    assert abs(float(m[0].float().mean()) - float(bright)) < 0.1  # its mask went with it
    small = torch.nn.functional.avg_pool2d(y[0:1], 4)[0] > 127
    assert bool((small == (m[0] > 0)).float().mean() > 0.9)
    assert torch.equal(y[1:], x[1:]) or not bool((y[1:] > 127).any())  # normals hold no defect
    no_labels, _ = run(x, only(inset=0.5), seed=3)
    assert torch.equal(no_labels, x)  # without labels (no known normal layer): no inset


def test_perspective_crop_and_rotation_move_the_layer():
    x = square(8, 64)
    for setting in ({"perspective": 0.05}, {"crop": 0.1}, {"rotate": 10.0}):
        y, _ = run(x, only(**setting))
        assert (y - x).abs().amax((1, 2, 3)).min() > 0, setting


def test_same_seed_same_batch_other_seed_other_batch():
    x = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    settings = AugmentSettings(hflip=True, jitter=0.2)  # every default on
    a, _ = run(x, settings, seed=1)
    b, _ = run(x, settings, seed=1)
    c, _ = run(x, settings, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 255


def test_augmentation_is_on_by_default_and_the_group_composes():
    default = augment_settings(compose("train", []).data)
    assert default.p > 0 and default.blur > 0 and default.white_balance > 0
    none = augment_settings(compose("train", ["data/augment=none"]).data)
    assert none.p == 0 and all(getattr(none, f) == 0 for f in OFF)
    one = augment_settings(compose("train", ["data=snu_fdm", "data.augment.blur=0"]).data)
    assert one.blur == 0 and one.noise == default.noise and one.vflip


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"blur": -1.0}, r"data.augment.blur=-1.0 is not valid: use a value >= 0"),
        ({"p": 2.0}, r"data.augment.p=2.0 is not valid: use a probability"),
        ({"scale": 1.5}, r"scale < 1"),
        ({"inset": 1.0}, r"data.augment.inset=1.0 would shrink layers to nothing"),
    ],
)
def test_bad_settings_are_named(override, match):
    with pytest.raises(InspectError, match=match):
        AugmentSettings(**override)


def test_evaluation_never_augments(monkeypatch):
    from inspect3d.data.preprocess import Preprocess
    from inspect3d.models import build_model
    from inspect3d.train import loop
    from inspect3d.train.dataset import LayerDataset

    def refuse(*args, **kwargs):
        raise AssertionError("augment called outside training")

    monkeypatch.setattr(loop, "augment", refuse)
    torch.manual_seed(0)
    net = build_model("smallcnn", 2, Preprocess(height=32, width=32), width=4)
    images = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8).numpy()
    loader = torch.utils.data.DataLoader(LayerDataset(images, [0, 1, 0]), batch_size=2)
    probs, labels, _ = loop.predict(net, loader, torch.device("cpu"))
    with torch.inference_mode():
        direct = torch.softmax(net.eval()(torch.from_numpy(images))[0], 1).numpy()
    assert probs == pytest.approx(direct, abs=1e-5) and labels.tolist() == [0, 1, 0]
