"""``fit_normal(cfg, out_dir) -> (summary, checkpoint path)``: a model from good layers only.

1. Read the layers of ``data.normal_class`` (other classes are ignored) and preprocess them.
2. Frozen EfficientNet-Lite0 patch features (``inspect3d.normal.features``).
3. Cross-fitting: the good layers are cut into ``normal.calib_folds`` (3) contiguous folds
   (identical images kept in one fold); each fold is scored by a scorer fitted on the other
   folds. These out-of-fold scores stand in for new good layers and set the threshold for
   ``normal.target_frr``; its expected false-reject rate and 95% interval follow from the
   order statistic (Beta distribution), whatever the score distribution.
4. The final scorer is fitted on all good layers; the checkpoint has the supervised format, so
   ``inspect3d export``/``eval`` work unchanged.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from inspect3d.data.manifest import Item
from inspect3d.data.sources import load_items, preprocess_of
from inspect3d.errors import InspectError
from inspect3d.io import write_json_atomic
from inspect3d.normal.patch import BUILDER, NormalNet, build_normal_net
from inspect3d.normal.stats import (
    frr_of_order_statistic,
    greedy_coreset,
    layer_order_threshold,
    shrunk_gaussian,
)
from inspect3d.train.checkpoint import config_hash, save_checkpoint
from inspect3d.train.dataset import load_layers
from inspect3d.train.loop import resolve_device

log = logging.getLogger(__name__)
DEFECT_CLASS = "defect"
MIN_LAYERS = 4
FEATURE_BACKBONES = ("efficientnet_lite0",)


def fit_normal(cfg: Any, out_dir: str | Path) -> tuple[str, Path]:
    """Fit, calibrate and save a normal-only model into ``out_dir``."""
    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    nc = cfg.normal
    _check_settings(cfg)
    pre = preprocess_of(cfg.data)
    items = good_items(cfg.data, nc.max_layers)
    images = load_layers(items, pre, nc.progress)
    net = build_normal_net(2, pre, **_model_node(cfg))
    device = resolve_device(nc.device)
    feats = extract(net, images, nc.batch_size, device, nc.progress)
    folds = fold_ids(images, min(nc.calib_folds, len(items)))
    oof = out_of_fold_scores(net, feats, folds, nc, cfg.seed)
    fit_scorer(net.scorer, feats, nc, cfg.seed)
    calib = calibrate(net, oof, nc.target_frr)
    path = _save(cfg, out_dir, net, pre, items, oof, folds, calib)
    return _summary(calib, len(items)), path


def _check_settings(cfg: Any) -> None:
    name = cfg.model.get("name")
    if name not in FEATURE_BACKBONES:
        raise InspectError(
            f"model={name!r} cannot give fit-normal its features: use one of "
            f"{list(FEATURE_BACKBONES)} (model=efficientnet_lite0, offline ImageNet weights)"
        )
    if not 0.0 <= cfg.normal.target_frr < 1.0:
        raise InspectError(
            f"normal.target_frr={cfg.normal.target_frr!r} is not valid: use a rate in [0, 1)"
        )
    if cfg.normal.calib_folds < 2:
        raise InspectError(
            f"normal.calib_folds={cfg.normal.calib_folds!r} is not valid: use 2 or more"
        )


def _model_node(cfg: Any) -> dict:
    nc = cfg.normal
    return {
        "name": f"{cfg.model.name}+{nc.method}",
        "method": nc.method,
        "grid_stride": nc.grid_stride,
        "layer_score": nc.layer_score,
        "topk": nc.topk,
        "bank_size": nc.bank_size,
        "pretrained": bool(cfg.model.get("pretrained", True)),
    }


def good_items(data: Any, max_layers: int | None) -> list[Item]:
    """The layers of ``data.normal_class``, at most ``max_layers`` of them (evenly spaced)."""
    items = load_items(data)
    found = sorted({it.label for it in items})
    good = [it for it in items if it.label == data.normal_class]
    if not good:
        raise InspectError(
            f"data.normal_class={data.normal_class!r} has no layers in {data.root!r}; "
            f"classes found: {found}"
        )
    if max_layers is not None and max_layers < len(good):
        if max_layers < MIN_LAYERS:
            raise InspectError(
                f"normal.max_layers={max_layers} is too few: use {MIN_LAYERS} or more"
            )
        pick = np.linspace(0, len(good) - 1, max_layers).round().astype(int)
        good = [good[i] for i in pick]
    if len(good) < MIN_LAYERS:
        raise InspectError(
            f"only {len(good)} good layer(s) of {data.normal_class!r}: fit-normal needs at least "
            f"{MIN_LAYERS} (about 20 give a usable threshold)"
        )
    others = len(items) - len([it for it in items if it.label == data.normal_class])
    log.info("fitting on %d good layers (%d layers of other classes ignored)", len(good), others)
    return good


def extract(
    net: NormalNet, images: np.ndarray, batch_size: int, device: torch.device, progress: bool
) -> torch.Tensor:
    """Patch features (N, C, h, w) of all layers, on the CPU."""
    features = net.features.to(device)
    out = []
    with torch.inference_mode():
        for i in tqdm(
            range(0, len(images), batch_size), desc="features", disable=not progress, leave=False
        ):
            out.append(features(torch.from_numpy(images[i : i + batch_size]).to(device)).cpu())
    features.cpu()
    return torch.cat(out)


def fold_ids(images: np.ndarray, k: int) -> np.ndarray:
    """Contiguous folds in data order (neighbouring layers look alike); identical images share
    the fold of their first copy, so no layer is scored against its own duplicate."""
    n = len(images)
    folds = (np.arange(n) * k) // n
    first: dict[str, int] = {}
    for i, img in enumerate(images):
        digest = hashlib.sha1(img.tobytes()).hexdigest()
        folds[i] = folds[first.setdefault(digest, i)]
    if len(set(folds.tolist())) < 2:
        raise InspectError("all good layers are identical: cannot calibrate a threshold")
    return folds


def _patches(feats: torch.Tensor) -> torch.Tensor:
    return feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])


def fit_scorer(scorer: torch.nn.Module, feats: torch.Tensor, nc: Any, seed: int) -> None:
    """Fit ``scorer`` (Gaussian or memory bank) on the patches of ``feats``."""
    patches = _patches(feats)
    if nc.method == "gaussian":
        mean, whiten = shrunk_gaussian(patches, nc.shrinkage)
        scorer.set_stats(mean, whiten)
        return
    gen = torch.Generator().manual_seed(seed)
    pool = patches[torch.randperm(len(patches), generator=gen)[: nc.coreset_pool]]
    idx = greedy_coreset(pool, scorer.bank.shape[0], seed)
    bank = pool[idx]
    if len(bank) < scorer.bank.shape[0]:  # fewer good patches than bank slots: repeat some
        bank = bank[torch.arange(scorer.bank.shape[0]) % len(bank)]
    scorer.set_bank(bank)


def out_of_fold_scores(
    net: NormalNet, feats: torch.Tensor, folds: np.ndarray, nc: Any, seed: int
) -> np.ndarray:
    """Layer distance of every good layer under a scorer fitted without its fold."""
    scores = np.empty(len(feats))
    for f in sorted(set(folds.tolist())):
        held = torch.from_numpy(folds == f)
        fit_scorer(net.scorer, feats[~held], nc, seed)
        scores[held.numpy()] = _layer_distances(net, feats[held]).numpy()
    return scores


def _layer_distances(net: NormalNet, feats: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        flat = net.scorer(feats).flatten(1)
    if net.layer_score == "max":
        return flat.max(dim=1).values
    return flat.topk(min(net.topk, flat.shape[1]), dim=1).values.mean(dim=1)


def calibrate(net: NormalNet, oof: np.ndarray, target_frr: float) -> dict:
    """Set the net's distance threshold and temperature; return the calibration record."""
    threshold, n_allowed = layer_order_threshold(oof, target_frr)
    temperature = max(float(np.std(oof)), 1e-3 * abs(threshold), 1e-6)
    net.threshold.fill_(threshold)
    net.temperature.fill_(temperature)
    record = {
        "method": f"out-of-fold order statistic ({n_allowed} of {len(oof)} good layers above)",
        "target_frr": float(target_frr),
        **frr_of_order_statistic(len(oof), n_allowed),
        "distance_threshold": threshold,
        "temperature": temperature,
    }
    if len(oof) < 1 / max(target_frr, 1e-9):
        log.warning(
            "%d good layers cannot resolve a %.1f%% false-reject rate: the threshold lies above "
            "the highest out-of-fold score, expected rate %.1f%% (95%% interval %.1f-%.1f%%)",
            len(oof),
            100 * target_frr,
            100 * record["expected_frr"],
            100 * record["frr_ci95"][0],
            100 * record["frr_ci95"][1],
        )
    return record


def _save(cfg, out_dir, net, pre, items, oof, folds, calib) -> Path:
    config = OmegaConf.to_container(cfg, resolve=True)
    oof_frr = (oof >= calib["distance_threshold"]).mean()
    metrics = {
        "mode": "normal_only",
        "n": len(items),
        "n_normal": len(items),
        "n_defect": 0,
        "n_folds": len(set(folds.tolist())),
        "calibration": calib,
        "oof_distance": {
            "min": float(oof.min()),
            "median": float(np.median(oof)),
            "max": float(oof.max()),
        },
        "threshold": {
            "value": 0.5,
            "false_reject_rate": float(oof_frr),
        },
    }
    meta = {
        "mode": "normal_only",
        "model": {"_target_": BUILDER, **_model_node(cfg)},
        "classes": [cfg.data.normal_class, DEFECT_CLASS],
        "normal_class": cfg.data.normal_class,
        "preprocess": pre.to_dict(),
        "config": config,
        "config_hash": config_hash(config),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = save_checkpoint(
        out_dir / "checkpoint.pt",
        net,
        meta,
        epoch=None,
        threshold=0.5,  # defect score 0.5 <=> distance at the calibrated threshold
        target_frr=float(cfg.normal.target_frr),
        calibration=calib,
        metrics=metrics,
        fit_layers=[str(it.path) for it in items],
    )
    write_json_atomic(
        out_dir / "metrics.json",
        {**metrics, "oof_scores": [float(v) for v in oof], "folds": folds.tolist()},
    )
    return path


def _summary(calib: dict, n: int) -> str:
    lo, hi = calib["frr_ci95"]
    return (
        f"normal-only model from {n} good layers: distance threshold "
        f"{calib['distance_threshold']:.4g} for target FRR {calib['target_frr']:.1%}; expected "
        f"FRR {calib['expected_frr']:.1%} (95% interval {lo:.1%}-{hi:.1%}, "
        f"{calib['n_calibration']} out-of-fold layers)"
    )
