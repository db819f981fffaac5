"""The bank's patch table (mirrored and rotated views, sampling) and whitened memory banks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from inspect3d.normal.fit import fit_banks
from inspect3d.normal.patch import MemoryBank, NormalNet, Whiten
from inspect3d.normal.views import (
    PatchTable,
    per_view_cap,
    rotate_cells,
    rotate_layers,
    sample_patches,
    view_transforms,
)


def test_views_are_the_layer_its_mirrors_and_rotations_that_repeat_none():
    views = view_transforms(mirror=True, rotations=4)
    assert views[0] == ((), 0.0)  # the layer as it is comes first (its features are kept)
    assert [d for _, d in views[4:]] == [45.0, 135.0, 225.0, 315.0]
    assert len(view_transforms(mirror=False, rotations=0)) == 1


def test_rotated_cells_keep_only_cells_inside_the_turned_region():
    cells = torch.zeros(1, 32, 32)
    cells[0, 4:28, 4:28] = 1.0
    cells[0, 14:18, 14:18] = 2.0  # a part in the middle stays a part
    turned = rotate_cells(cells, 45.0)
    assert turned[0, 16, 16] == 2.0
    assert turned[0, 0, 0] == 0.0  # the padding is never a patch
    assert cells[0, 5, 5] == 1.0 and turned[0, 5, 5] == 0.0  # a plate corner turns away
    assert 0 < (turned > 0).sum() < (cells > 0).sum()  # the corners of the plate turn out


def test_rotated_layers_are_turned_about_their_centre():
    img = np.zeros((1, 1, 65, 65), np.uint8)
    img[0, 0, 32, 40:] = 255  # a line to the right of the centre
    turned = rotate_layers(img, 90.0)[0, 0]
    assert turned[10, 32] > 128 and turned[32, 60] < 128  # now above the centre (counter-clockwise)


def test_sampling_keeps_at_most_the_cap_per_layer_and_only_roi_cells():
    feats = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    cells = torch.zeros(2, 4, 4)
    cells[0, :2] = 1.0  # 8 powder cells in layer 0
    cells[1, 0, 0] = 2.0  # one part cell in layer 1
    table = sample_patches(feats, cells, cap=5, gen=torch.Generator().manual_seed(0))
    assert (table.layers == 0).sum() == 5 and (table.layers == 1).sum() == 1
    assert table.kinds[table.layers == 1].tolist() == [2.0]
    assert table.patches[table.layers == 1].tolist() == [feats[1, :, 0, 0].tolist()]
    assert len(table.without(np.array([0])).layers) == 1
    assert per_view_cap(100_000, 20, 16) == 625  # twice the pool over all layers and views


def test_a_whitened_bank_sees_a_shift_along_a_quiet_direction():
    """Good patches vary 10x less along channel 0 than along the 15 others (as powder texture
    varies along a few feature directions). Moving a good patch 5 standard deviations along
    the quiet channel makes it an outlier that the whitened bank ranks above fresh good
    patches, while plain Euclidean distances drown it in the loud channels' spread."""
    gen = torch.Generator().manual_seed(0)
    scale = torch.full((16,), 10.0)
    scale[0] = 1.0
    table = PatchTable(
        torch.randn(4000, 16, generator=gen) * scale, torch.ones(4000), torch.arange(4000) % 4
    )
    nc = OmegaConf.create({"method": "patchcore", "coreset_pool": 4000, "shrinkage": 0.01})
    fresh = torch.randn(300, 16, generator=gen) * scale
    shifted = fresh + torch.eye(16)[0] * 5.0

    def auroc(whiten: bool) -> float:
        net = NormalNet(
            torch.nn.Identity(), MemoryBank(512, 16), whiten=Whiten(16) if whiten else None
        )
        fit_banks(net, table, nc, seed=0)
        with torch.inference_mode():
            d = net.raw_maps(torch.cat([fresh, shifted])[:, :, None, None])[0].flatten()
        return float((d[300:, None] > d[None, :300]).float().mean())

    assert auroc(whiten=True) > 0.85
    assert auroc(whiten=False) < 0.7


@pytest.mark.parametrize("degrees", [0.0, 30.0])
def test_rotation_by_zero_is_the_identity_and_others_change_the_layer(degrees):
    img = np.random.default_rng(0).integers(0, 255, (1, 1, 32, 48), dtype=np.uint8)
    same = np.array_equal(rotate_layers(img, degrees), img)
    assert same == (degrees == 0.0)
