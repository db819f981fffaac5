"""Many layer images read and preprocessed at once (numpy only: training, fitting, benchmarks)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
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
        list(
            tqdm(
                pool.map(load, range(len(items))),
                total=len(items),
                desc="loading layers",
                disable=not progress,
                leave=False,
            )
        )
    if errors:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise InspectError(
            f"{len(errors)} unreadable layer image(s): " + "; ".join(errors[:5]) + more
        )
    return out
