"""The bank's patch table (mirrored and rotated views, sampling) and whitened memory banks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from inspect3d.normal.fit import fit_banks, out_of_fold_scores, out_of_region_scores
from inspect3d.normal.patch import MemoryBank, NormalNet, Whiten
from inspect3d.normal.views import (
    PatchTable,
    mirror,
    per_view_cap,
    region_boxes,
    region_ids,
    rotate_cells,
    rotate_layers,
    sample_patches,
    turn_ids,
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
    regions = region_ids(2, (4, 4), 2)
    table = sample_patches(feats, cells, regions, cap=5, gen=torch.Generator().manual_seed(0))
    assert (table.layers == 0).sum() == 5 and (table.layers == 1).sum() == 1
    assert table.kinds[table.layers == 1].tolist() == [2.0]
    assert table.patches[table.layers == 1].tolist() == [feats[1, :, 0, 0].tolist()]
    assert len(table.without(np.array([0])).layers) == 1
    assert table.regions[table.layers == 1].tolist() == [0]  # cell (0, 0): the top-left region
    assert set(table.outside(0).regions.tolist()) <= {1}  # layer 0's top rows: regions 0 and 1
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
        torch.randn(4000, 16, generator=gen) * scale,
        torch.ones(4000),
        torch.arange(4000) % 4,
        torch.zeros(4000, dtype=torch.long),
    )
    nc = OmegaConf.create(
        {"method": "patchcore", "coreset_pool": 4000, "shrinkage": 0.01, "residual_weight": 1.0}
    )
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


def test_regions_tile_the_grid_and_views_keep_the_region_their_cells_came_from():
    boxes = region_boxes((5, 7), 2)
    covered = torch.zeros(5, 7)
    for rows, cols in boxes:
        covered[rows, cols] += 1
    assert len(boxes) == 4 and bool((covered == 1).all())  # every cell in exactly one region
    ids = region_ids(1, (8, 8), 2)
    assert ids[0, 0, 7] == 1 and ids[0, 7, 0] == 2
    flipped = mirror(ids, (-1,))  # left-right: the top-left cells' patches now lie top right
    assert flipped[0, 0, 7] == 0 and flipped[0, 7, 7] == 2
    turned = turn_ids(ids, 45.0)
    assert turned[0, 4, 4] in (0.0, 1.0, 2.0, 3.0) and turned[0, 0, 0] == -1.0  # no source
    assert torch.equal(turn_ids(ids, 0.0), ids)


def test_one_jobs_parts_are_calibrated_as_shapes_at_places_never_seen():
    """Six layers of one job, a part (a feature far from powder) at the same place in each:
    blocks of layers share that part, so its out-of-fold score is that of a familiar patch
    and a threshold from it is exceeded by the next job's new part. Holding out the region
    instead scores the part as a shape the scorer has never seen."""
    gen = torch.Generator().manual_seed(0)
    n, c, h, w = 6, 8, 16, 16
    feats = torch.randn(n, c, h, w, generator=gen)
    feats[:, 0, 2:4, 2:4] += 12.0  # the part, in the top-left region of every layer
    cells = torch.ones(n, h, w)
    table = sample_patches(feats, cells, region_ids(n, (h, w), 2), cap=h * w, gen=gen)
    nc = OmegaConf.create(
        {
            "method": "patchcore",
            "coreset_pool": 10_000,
            "shrinkage": 0.01,
            "calib_grid": 2,
            "residual_weight": 1.0,
        }
    )
    net = NormalNet(torch.nn.Identity(), MemoryBank(256, c), layer_score="max")
    by_block = out_of_fold_scores(net, feats, cells, table, np.repeat([0, 1, 2], 2), nc, 0)
    by_region = out_of_region_scores(net, feats, cells, table, nc, 0)
    assert by_region.min() > 2 * by_block.max(), (by_region, by_block)
