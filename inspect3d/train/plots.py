"""Training curves and confusion matrices as PNG (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from inspect3d.io import save_atomic  # noqa: E402


def plot_curves(history: list[dict], path: Path) -> Path:
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train (layer + map)")
    ax1.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation (layer)")
    ax1.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax1.legend()
    for key in ("val_accuracy", "val_macro_f1", "val_auroc"):
        values = [np.nan if h.get(key) is None else h[key] for h in history]
        ax2.plot(epochs, values, "o-", label=key.removeprefix("val_"))
    ax2.set(xlabel="epoch", ylim=(0, 1.02), title="validation")
    ax2.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(cm: list[list[int]], classes: list[str], path: Path, title: str) -> Path:
    cm_arr = np.asarray(cm)
    size = 2.5 + 0.6 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(cm_arr, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    for (i, j), v in np.ndenumerate(cm_arr):
        color = "white" if v > cm_arr.max() / 2 else "black"
        ax.text(j, i, str(v), ha="center", va="center", color=color)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    try:
        return save_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
