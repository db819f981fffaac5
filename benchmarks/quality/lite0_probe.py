"""The "pretrained" rows of the quality benchmarks: the product's own probe, per fold.

Each fold runs ``inspect3d train model=efficientnet_lite0 model.freeze=true`` (inspect3d/train/
freeze.py): the ImageNet EfficientNet-Lite0 backbone stays frozen, its features of every
training and held-out layer are computed once, and only the 1x1 head trains on them (with mean
pooling, a logistic regression on the mean feature that also gives the defect map); the best
epoch by held-out macro-F1 is kept, as for the other CNN rows. What a user trains is what is
measured.
"""

from __future__ import annotations

from pathlib import Path

import common
import numpy as np

PROBE_EPOCHS = 30  # epochs of the head on cached features: about a second each
PROBE = ("model=efficientnet_lite0", "model.freeze=true", f"trainer.epochs={PROBE_EPOCHS}")


def probe_predictions(overrides: list[str], out_dir: Path) -> tuple[np.ndarray, dict]:
    """Held-out class probabilities and run metrics of the frozen-Lite0 probe on one fold
    (``overrides`` name the data and the fold; the probe's settings come last and win)."""
    return common.train_and_predict(common.compose_train([*overrides, *PROBE]), out_dir)
