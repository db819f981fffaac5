"""The good patches a memory bank is chosen from: each good layer as it is, mirrored and rotated.

The bank remembers the good layers mirrored (left-right, top-bottom, both) and rotated by
``normal.rotations`` evenly spaced angles: parts, outlines and hatching then look familiar in
the orientations new jobs place them in. Rotated views keep only cells whose whole
neighbourhood lies inside the rotated region of interest (no frame, no padding).

Only a random sample of each view's patches is kept (about twice ``normal.coreset_pool`` in
all, drawn evenly from every layer and view), so memory stays bounded at native resolution and
with many views; the bank's pool is drawn from this table, as it would be from all patches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

# Mirrors keep horizontal lines horizontal; flips of both axes are the 180-degree turn.
MIRRORS = ((), (-1,), (-2,), (-2, -1))
TABLE_OVER_POOL = 2  # patches kept in the table per patch of the pool


@dataclass
class PatchTable:
    """Sampled good patches: features (P, C), cell kind (P,) 1 powder / 2 part, layer (P,),
    and the region of the layer (P,) each came from, in the layer's own frame (a mirrored or
    turned view keeps the region of its source cell: see ``region_ids``)."""

    patches: torch.Tensor
    kinds: torch.Tensor
    layers: torch.Tensor
    regions: torch.Tensor

    def without(self, held: np.ndarray) -> PatchTable:
        """The patches of layers not in ``held`` (layer indices)."""
        return self._keep(~torch.isin(self.layers, torch.from_numpy(np.asarray(held, np.int64))))

    def outside(self, region: int) -> PatchTable:
        """The patches that did not come from ``region`` of any layer."""
        return self._keep(self.regions != region)

    def _keep(self, keep: torch.Tensor) -> PatchTable:
        return PatchTable(
            self.patches[keep], self.kinds[keep], self.layers[keep], self.regions[keep]
        )


def view_transforms(mirror: bool, rotations: int) -> list[tuple[tuple[int, ...], float]]:
    """(mirror dims, rotation degrees) of every view; the first is the layer as it is.
    Rotations are offset by half a step, so none repeats a mirror (0, 90, 180, 270 degrees
    with ``rotations`` = 4 would repeat the identity and the 180-degree turn)."""
    views = [(dims, 0.0) for dims in (MIRRORS if mirror else MIRRORS[:1])]
    step = 360.0 / rotations if rotations > 0 else 0.0
    views += [((), step * (i + 0.5)) for i in range(rotations)]
    return views


def mirror(x, dims: tuple[int, ...]):
    """A layer batch (N, C, H, W) or cell weights (N, h, w), numpy or torch, flipped on ``dims``."""
    if not dims:
        return x
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(np.flip(x, axis=dims))
    return torch.flip(x, dims=dims)


def rotate_layers(images: np.ndarray, degrees: float) -> np.ndarray:
    """uint8 layers (N, C, H, W) turned by ``degrees`` about their centre (edges reflected)."""
    if degrees == 0:
        return images
    n, c, h, w = images.shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    out = np.empty_like(images)
    for i in range(n):
        for j in range(c):
            out[i, j] = cv2.warpAffine(
                images[i, j], m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
            )
    return out


def rotate_cells(cells: torch.Tensor, degrees: float) -> torch.Tensor:
    """Cell weights (N, h, w) turned like the layers; a cell keeps its kind only where its
    3x3 neighbourhood stays inside the turned region (0 elsewhere)."""
    if degrees == 0:
        return cells
    out = torch.zeros_like(cells)
    for i in range(len(cells)):
        turned = _turn_grid(cells[i].numpy(), degrees, 0.0)
        inside = cv2.erode((turned > 0).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        out[i] = torch.from_numpy(np.where(inside, turned, 0.0))
    return out


def _turn_grid(grid: np.ndarray, degrees: float, outside: float) -> np.ndarray:
    """A map grid (h, w) turned about its centre like the layers, nearest cell; ``outside``
    where nothing turns in."""
    h, w = grid.shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    return cv2.warpAffine(
        grid.astype(np.float32), m, (w, h), flags=cv2.INTER_NEAREST, borderValue=outside
    )


def region_boxes(grid: tuple[int, int], side: int) -> list[tuple[slice, slice]]:
    """The map grid (h, w) cut into ``side`` x ``side`` rectangles (rows, columns), row by row."""
    ys, xs = (np.linspace(0, n, side + 1).round().astype(int) for n in grid)
    return [
        (slice(ys[r], ys[r + 1]), slice(xs[c], xs[c + 1])) for r in range(side) for c in range(side)
    ]


def region_ids(n: int, grid: tuple[int, int], side: int) -> torch.Tensor:
    """(n, h, w) ids of the ``region_boxes`` each cell lies in."""
    ids = torch.zeros(grid, dtype=torch.float32)
    for i, (rows, cols) in enumerate(region_boxes(grid, side)):
        ids[rows, cols] = i
    return ids.expand(n, *grid).clone()


def turn_ids(ids: torch.Tensor, degrees: float) -> torch.Tensor:
    """Region ids (N, h, w) turned like the layers (nearest cell; -1 where nothing turns in)."""
    if degrees == 0:
        return ids
    return torch.from_numpy(np.stack([_turn_grid(g.numpy(), degrees, -1.0) for g in ids]))


def per_view_cap(pool: int, n_layers: int, n_views: int) -> int:
    """Patches kept per layer and view so the table holds about twice the pool."""
    return max(1, math.ceil(TABLE_OVER_POOL * pool / max(1, n_layers * n_views)))


def sample_patches(
    feats: torch.Tensor,
    cells: torch.Tensor,
    regions: torch.Tensor,
    cap: int,
    gen: torch.Generator,
) -> PatchTable:
    """At most ``cap`` random patches with cell weight > 0 of each layer ``i`` of ``feats``,
    with their cells' kinds and ``regions`` (N, h, w)."""
    rows, kinds, layers, where_from = [], [], [], []
    for i in range(len(feats)):
        where = torch.nonzero(cells[i].reshape(-1) > 0).squeeze(1)
        where = where[torch.randperm(len(where), generator=gen)[:cap]]
        flat = feats[i].reshape(feats.shape[1], -1)
        rows.append(flat[:, where].T)
        kinds.append(cells[i].reshape(-1)[where])
        layers.append(torch.full((len(where),), i, dtype=torch.long))
        where_from.append(regions[i].reshape(-1)[where].long())
    return PatchTable(torch.cat(rows), torch.cat(kinds), torch.cat(layers), torch.cat(where_from))


def concat(tables: list[PatchTable]) -> PatchTable:
    return PatchTable(
        torch.cat([t.patches for t in tables]),
        torch.cat([t.kinds for t in tables]),
        torch.cat([t.layers for t in tables]),
        torch.cat([t.regions for t in tables]),
    )
