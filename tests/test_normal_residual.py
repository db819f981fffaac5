"""Pixel-scale residual channels of normal-only patches: thin streaks and specks on powder."""

from __future__ import annotations

import numpy as np
import torch

from inspect3d.normal import patch
from inspect3d.normal.features import PixelResidual
from inspect3d.normal.patch import MemoryBank

ROW_UP, COL_UP, SPECK_UP = 0, 1, 2  # bright responses; 4-7 are the dark ones


def powder(seed: int, size: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).normal(120, 6, (size, size)).clip(0, 255)


def responses(img: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(img.round().astype(np.uint8))[None, None]
    return PixelResidual()(x)[0]


def test_a_faint_one_pixel_streak_tops_the_row_line_response_on_its_cells():
    img = powder(0)
    img[131, 30:230] += 12  # 2x the grain's spread, 1 px wide: invisible cell by cell
    res = responses(img)
    assert res.shape == (8, 32, 32)
    rows = res[ROW_UP].amax(dim=1)  # the strongest cell of each row of cells
    assert int(rows.argmax()) == 131 // 8
    assert float(rows[131 // 8]) > 2 * float(torch.cat([rows[:15], rows[18:]]).max())
    # the column response does not see it, and the clean layer has no such row
    assert float(res[COL_UP].amax(dim=1)[131 // 8]) < float(rows[131 // 8]) / 2
    assert float(responses(powder(0))[ROW_UP].amax(dim=1).max()) < float(rows[131 // 8]) / 2


def test_a_dark_speck_shows_in_the_dark_speck_channel_where_it_lies():
    img = powder(1)
    yy, xx = np.mgrid[:256, :256]
    img[(yy - 70) ** 2 + (xx - 190) ** 2 <= 2] -= 45
    res = responses(img)
    dark = res[4 + SPECK_UP]
    assert np.unravel_index(int(dark.argmax()), dark.shape) == (70 // 8, 190 // 8)
    assert float(res[SPECK_UP].max()) < float(dark.max())


def clusters(n: int, deep_at: float, res_at: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    deep = deep_at + 0.3 * torch.randn(n, 2, generator=g)
    res = res_at + 0.2 * torch.randn(n, 1, generator=g)
    return torch.cat([deep, res], dim=1)


def test_a_residual_counts_against_the_good_patches_of_its_context():
    # plain powder (deep features near 0) has quiet residuals; part rims (deep near 5) bright
    good = torch.cat([clusters(300, 0.0, 0.0, 0), clusters(300, 5.0, 3.0, 1)])
    bank = MemoryBank(len(good), 2, extra=1)
    bank.set_bank(good, sample=good)
    assert float(bank.res_weight) > 0
    queries = torch.tensor([[0.0, 0.0, 0.0], [5.0, 5.0, 3.0], [0.0, 0.0, 3.0], [5.0, 5.0, 0.0]])
    quiet_powder, bright_rim, bright_powder, dull_rim = bank(queries.T[None, :, :, None]).flatten()
    normal = max(float(quiet_powder), float(bright_rim))
    # the same bright residual is a defect on powder, and a dull rim is off too
    assert float(bright_powder) > 3 * normal
    assert float(dull_rim) > 3 * normal


def test_residual_weight_sets_how_much_a_residual_counts():
    good = torch.cat([clusters(300, 0.0, 0.0, 6), clusters(300, 5.0, 3.0, 7)])
    bright_powder = torch.tensor([[0.0, 0.0, 3.0]]).T[None, :, :, None]
    deep_only = MemoryBank(len(good), 2)
    deep_only.set_bank(good[:, :2])
    scores = {}
    for weight in (0.5, 1.0, 2.0):
        bank = MemoryBank(len(good), 2, extra=1)
        bank.set_bank(good, sample=good, weight=weight)
        scores[weight] = float(bank(bright_powder)) - float(deep_only(bright_powder[:, :2]))
    assert scores[0.5] > 0
    assert abs(scores[1.0] / scores[0.5] - 2) < 1e-3 and abs(scores[2.0] / scores[1.0] - 2) < 1e-3


def test_the_residual_search_over_bank_chunks_matches_one_search(monkeypatch):
    good = torch.cat([clusters(300, 0.0, 0.0, 2), clusters(300, 5.0, 3.0, 3)])
    queries = torch.cat([clusters(50, 0.0, 1.5, 4), clusters(50, 5.0, 1.5, 5)]).T[None, :, :, None]
    bank = MemoryBank(len(good), 2, extra=1)
    bank.set_bank(good, sample=good)
    whole = bank(queries)
    monkeypatch.setattr(patch, "BANK_CHUNK", 64)
    assert torch.allclose(bank(queries), whole, atol=1e-5)


def pixel_evidence(layers: list[np.ndarray], inside: np.ndarray) -> patch.PixelEvidence:
    """A ``PixelEvidence`` whose units are set from ``layers`` on the ``inside`` cells."""
    ev = patch.PixelEvidence()
    x = torch.from_numpy(np.stack(layers).round().astype(np.uint8))[:, None]
    res = ev.responses(x)
    ev.set_scale(res, torch.from_numpy(inside).expand(len(layers), -1, -1))
    return ev


def test_pixel_evidence_is_in_units_of_good_cells_inside_the_plate_only():
    inside = np.zeros((32, 32), bool)
    inside[8:30, 2:30] = True  # the plate: 48 px clear of the rail's edge
    layers = [powder(s) for s in range(3)]
    for img in layers:
        img[:16] = 250  # a bright rail outside the plate, whose edge responds strongly
    ev = pixel_evidence(layers, inside)
    plain = pixel_evidence([powder(s) for s in range(3)], inside)
    assert torch.allclose(ev.scale, plain.scale, rtol=0.2)  # the rail did not set the units
    x = torch.from_numpy(layers[0].round().astype(np.uint8))[None, None]
    good = ev(x)[0, 0].numpy()[inside]
    assert good.min() >= 0 and 1.0 <= float(np.quantile(good, 0.99)) < 2.0


def test_the_fused_map_peaks_on_a_streak_the_deep_distance_barely_shows():
    ev = pixel_evidence([powder(s) for s in range(3)], np.ones((32, 32), bool))
    img = powder(7)
    img[131, 30:230] += 12  # 2x the grain's spread, 1 px wide
    x = torch.from_numpy(img.round().astype(np.uint8))[None, None]
    deep = torch.from_numpy(np.random.default_rng(3).uniform(0.9, 1.1, (1, 1, 32, 32))).float()
    deep[0, 0, 131 // 8] *= 1.02  # the deep features see the streak a little
    net = patch.NormalNet(torch.nn.Identity(), torch.nn.Identity(), pixel_weight=0.2)
    net.pixel = ev
    fused = net.post_process(deep, ev(x))[0, 0]
    assert int(fused.amax(dim=1).argmax()) == 131 // 8
    assert float(fused.amax(dim=1)[131 // 8]) > 1.05 * float(deep[0, 0].max())
    # weight 0: the map is the deep distance as it is (models fitted before the pixel evidence)
    assert patch.NormalNet(torch.nn.Identity(), torch.nn.Identity()).pixel is None
    assert torch.equal(
        patch.NormalNet(torch.nn.Identity(), torch.nn.Identity()).post_process(deep), deep
    )
