"""Frozen ImageNet EfficientNet-Lite0 features and a linear probe on them.

Fine-tuning the pretrained backbone per fold is too slow for a 2-core CPU budget, so the
"pretrained" rows of the benchmarks freeze it: every image goes through inspect3d's own
``efficientnet_lite0`` LayerNet (same preprocessing and in-graph normalisation as training)
once, its last feature map is mean- and max-pooled, and a multinomial logistic regression
(L2, class-balanced, standardised features) is fitted per fold on the training side only.
"""

from __future__ import annotations

import numpy as np
import torch

from inspect3d.data.manifest import Item
from inspect3d.data.preprocess import Preprocess
from inspect3d.train.dataset import load_layers


@torch.inference_mode()
def pooled_features(items: list[Item], pre: Preprocess, batch: int = 16) -> np.ndarray:
    """(N, 2 * 1280) mean- and max-pooled last feature map of every item, float32."""
    from inspect3d.models import build_model

    net = build_model("efficientnet_lite0", 2, pre, pretrained=True).eval()
    out = []
    for start in range(0, len(items), batch):
        x = torch.from_numpy(load_layers(items[start : start + batch], pre, progress=False))
        f = net.backbone(net.normalize(x))
        out.append(torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1).numpy())
    return np.concatenate(out).astype(np.float32)


def fit_predict(
    train_x: np.ndarray,
    train_y: np.ndarray,
    x: np.ndarray,
    k: int,
    l2: float = 1e-2,
    steps: int = 200,
    seed: int = 0,
) -> np.ndarray:
    """Class probabilities of ``x`` from a logistic regression fitted on the training side."""
    torch.manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    tx = torch.from_numpy((train_x - mean) / std)
    ty = torch.from_numpy(train_y).long()
    counts = np.bincount(train_y, minlength=k).astype(np.float32)
    weight = torch.from_numpy(len(train_y) / (k * np.maximum(counts, 1)))
    lin = torch.nn.Linear(tx.shape[1], k)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(tx), ty, weight=weight)
        loss = loss + l2 * lin.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.inference_mode():
        return torch.softmax(lin(torch.from_numpy((x - mean) / std)), 1).numpy()
