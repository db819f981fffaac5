"""Torch side of the data: a cached dataset of preprocessed layers, and batch augmentation."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm import tqdm

from inspect3d.data.manifest import Item
from inspect3d.data.preprocess import Preprocess
from inspect3d.errors import InspectError


def load_layers(items: list[Item], pre: Preprocess, progress: bool = True) -> np.ndarray:
    """All items preprocessed into one uint8 array (N, C, H, W); every bad file is reported."""
    out = np.empty((len(items), pre.channels, pre.height, pre.width), dtype=np.uint8)
    errors: list[str] = []

    def load(i: int) -> None:
        try:
            out[i] = pre.load(items[i].path)
        except InspectError as exc:
            errors.append(str(exc))

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(tqdm(pool.map(load, range(len(items))), total=len(items), desc="loading layers",
                  disable=not progress, leave=False))
    if errors:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise InspectError(f"{len(errors)} unreadable layer image(s): " + "; ".join(errors[:5]) + more)
    return out


class LayerDataset(torch.utils.data.Dataset):
    """Preprocessed layers held in memory (decoding once; epochs then cost no I/O)."""

    def __init__(self, images: np.ndarray, labels: list[int]) -> None:
        self.images = torch.from_numpy(images)
        self.labels = torch.tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


def augment(
    x: torch.Tensor, jitter: float, hflip: bool, vflip: bool, gen: torch.Generator
) -> torch.Tensor:
    """Random flips and brightness/contrast jitter on a uint8 batch; returns float 0..255."""
    x = x.float()
    n = x.shape[0]
    if hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        x[flip] = x[flip].flip(-1)
    if vflip:
        flip = torch.rand(n, generator=gen) < 0.5
        x[flip] = x[flip].flip(-2)
    if jitter > 0:
        shape = (n, 1, 1, 1)
        contrast = 1 + (torch.rand(shape, generator=gen) * 2 - 1) * jitter
        brightness = (torch.rand(shape, generator=gen) * 2 - 1) * jitter * 128
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * contrast + mean + brightness).clamp_(0, 255)
    return x
