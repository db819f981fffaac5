"""Torch side of the data: a cached dataset of preprocessed layers (augmentation: augment.py)."""

from __future__ import annotations

import numpy as np
import torch

from inspect3d.data.manifest import Item
from inspect3d.data.preprocess import Preprocess

MASK_STRIDE = 4  # masks are kept at 1/4 of the input size; the defect map is coarser still


def load_masks(
    items: list[Item], labels: list[int], pre: Preprocess
) -> tuple[np.ndarray, np.ndarray]:
    """Defect masks (N, 1, H/4, W/4) uint8 and whether each is known.

    A normal layer's mask is known to be empty; a defect layer without a mask file is unknown
    (its cells are then left out of the map loss).
    """
    h, w = pre.height // MASK_STRIDE, pre.width // MASK_STRIDE
    masks = np.zeros((len(items), 1, h, w), dtype=np.uint8)
    known = np.array(
        [lab == 0 or it.mask is not None for it, lab in zip(items, labels, strict=True)]
    )
    mask_pre = Preprocess(height=h, width=w, channels=1)
    for i, it in enumerate(items):
        if it.mask is not None and labels[i] != 0:
            masks[i] = mask_pre.load(it.mask) > 0
    return masks, known


class LayerDataset(torch.utils.data.Dataset):
    """Preprocessed layers (and masks) held in memory: decoded once, epochs cost no I/O."""

    def __init__(
        self,
        images: np.ndarray,
        labels: list[int],
        masks: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        self.images = torch.from_numpy(images)
        self.labels = torch.tensor(labels, dtype=torch.long)
        n, _, h, w = images.shape
        if masks is None:
            masks = (
                np.zeros((n, 1, h // MASK_STRIDE, w // MASK_STRIDE), np.uint8),
                np.zeros(n, bool),
            )
        self.masks = torch.from_numpy(masks[0])
        self.known = torch.from_numpy(masks[1])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return self.images[i], self.labels[i], self.masks[i], self.known[i]
