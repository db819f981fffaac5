"""``fit_normal(cfg, out_dir) -> (summary, checkpoint path)``: a model from good layers only.

1. Read the layers of ``data.normal_class`` (other classes are ignored) and preprocess them,
   by default at their own (native) size, aspect kept: thin streaks stay a few pixels wide.
2. The region of interest (``normal.roi``: the build plate; ``auto`` finds it).
3. Frozen EfficientNet-Lite0 patch features (``inspect3d.normal.features``), in batches sized
   to the memory at hand.
4. Cross-fitting: the good layers are cut into folds, one per job when the layers come from two
   or more jobs (each job is then scored as a new job would be), else ``normal.calib_folds``
   contiguous folds (identical images kept in one fold); each fold is scored by a scorer
   fitted on the other folds. These out-of-fold scores stand in for new good layers and set
   the threshold for ``normal.target_frr``; its expected false-reject rate and 95% interval
   follow from the order statistic (Beta distribution), whatever the score distribution.
5. The final scorer is fitted on all good layers. With part masks (``ROOT/_parts/<layer file
   name>``, white = part), part and part-outline patches get their own share of the memory
   bank, so parts of every shape seen are remembered next to plain powder.
6. The checkpoint has the supervised format, so ``inspect3d export``/``eval`` work unchanged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import resource
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from inspect3d.data.manifest import Item
from inspect3d.data.preprocess import Preprocess, image_size, read_image
from inspect3d.data.sources import load_items, preprocess_of
from inspect3d.errors import InspectError
from inspect3d.io import write_json_atomic
from inspect3d.normal.patch import BUILDER, NormalNet, build_normal_net
from inspect3d.normal.roi import auto_roi, parse_roi
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
MIN_LAYERS = 5
RESOLUTIONS = ("native", "data")
BYTES_PER_INPUT_PIXEL = 400  # peak feature-extraction memory per input pixel (measured ~250)
FEATURE_BACKBONES = ("efficientnet_lite0",)


def fit_normal(cfg: Any, out_dir: str | Path) -> tuple[str, Path]:
    """Fit, calibrate and save a normal-only model into ``out_dir``."""
    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    nc = cfg.normal
    _check_settings(cfg)
    items = good_items(cfg.data, nc.max_layers)
    native = native_size(items)
    pre = input_preprocess(cfg.data, nc, native)
    images = load_layers(items, pre, nc.progress)
    roi = resolve_roi(nc.roi, images, native)
    net = build_normal_net(2, pre, **_model_node(cfg, roi))
    device = resolve_device(nc.device)
    batch = batch_size_for(pre, nc)
    cells = cell_weights(net, items, cfg.data, net.features.grid(*pre.size), native, nc.use_parts)
    views = [
        (extract(net, _mirror(images, f), batch, device, nc.progress), _mirror(cells, f))
        for f in (MIRRORS if nc.mirror else MIRRORS[:1])
    ]
    folds = calibration_folds(items, images, nc.calib_folds)
    oof = out_of_fold_scores(net, views, folds, nc, cfg.seed)
    fit_scorer(net.scorer, *_stack(views, slice(None)), nc, cfg.seed)
    calib = calibrate(net, oof, nc.target_frr)
    peak = peak_rss_mb()
    log.info("fit-normal peak memory %.0f MB", peak)
    path = _save(cfg, out_dir, net, pre, items, oof, folds, calib, roi, cells, peak)
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
    if cfg.normal.resolution not in RESOLUTIONS:
        raise InspectError(
            f"normal.resolution={cfg.normal.resolution!r} is not valid: use one of {RESOLUTIONS}"
        )
    if cfg.normal.bank_size < 1:
        raise InspectError(f"normal.bank_size={cfg.normal.bank_size!r} is not valid: use 1 or more")
    if cfg.normal.calib_folds < 2:
        raise InspectError(
            f"normal.calib_folds={cfg.normal.calib_folds!r} is not valid: use 2 or more"
        )


def _model_node(cfg: Any, roi: list | None) -> dict:
    nc = cfg.normal
    return {
        "name": f"{cfg.model.name}+{nc.method}",
        "method": nc.method,
        "grid_stride": nc.grid_stride,
        "layer_score": nc.layer_score,
        "topk": nc.topk,
        "bank_size": nc.bank_size,
        "pretrained": bool(cfg.model.get("pretrained", True)),
        "smooth_px": float(nc.smooth_px),
        "roi": roi,
    }


def native_size(items: list[Item]) -> tuple[int, int]:
    """(height, width) of the fitting layers (the most common size, if they differ)."""
    sizes = Counter(_image_size(it.path) for it in items)
    (size, count), *_ = sizes.most_common(1)
    if len(sizes) > 1:
        log.warning(
            "good layers come in %d sizes; fitting at the most common, %dx%d (%d of %d layers)",
            len(sizes),
            size[1],
            size[0],
            count,
            len(items),
        )
    return size


def _image_size(path: Path) -> tuple[int, int]:
    head = np.fromfile(str(path), dtype=np.uint8, count=65536).tobytes()
    wh = image_size(head)
    if wh is None:  # not a PNG/JPEG/BMP header: decode it
        return tuple(read_image(path, 1).shape[:2])
    return int(wh[1]), int(wh[0])


def input_preprocess(data: Any, nc: Any, native: tuple[int, int]) -> Preprocess:
    """The model's input size: the layers' own (aspect kept, long side at most
    ``normal.max_side``) with ``normal.resolution=native``, else data.height x data.width."""
    pre = preprocess_of(data)
    if nc.resolution == "data":
        return pre
    h, w = native
    scale = min(1.0, nc.max_side / max(h, w))
    size = {"height": max(32, round(h * scale)), "width": max(32, round(w * scale))}
    log.info("fit-normal input %dx%d (layers %dx%d)", size["width"], size["height"], w, h)
    return Preprocess.from_dict({**pre.to_dict(), **size})


def resolve_roi(spec: Any, images: np.ndarray, native: tuple[int, int]) -> list | None:
    if isinstance(spec, str) and spec.lower() == "auto":
        return auto_roi(images)
    return parse_roi(spec, native[1], native[0])


def batch_size_for(pre: Preprocess, nc: Any) -> int:
    """``normal.batch_size``, lowered so a batch's feature extraction fits the memory budget."""
    budget = memory_budget_bytes(nc.memory_gb)
    per_layer = BYTES_PER_INPUT_PIXEL * pre.height * pre.width * pre.channels
    fits = max(1, int(budget // per_layer))
    if fits < nc.batch_size:
        log.info(
            "batches of %d layers (of %d) to stay within %.1f GB",
            fits,
            nc.batch_size,
            budget / 2**30,
        )
    return min(nc.batch_size, fits)


def memory_budget_bytes(memory_gb: float | None) -> float:
    """``memory_gb`` in bytes, else a quarter of the memory available now."""
    if memory_gb:
        return memory_gb * 2**30
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        avail = 8 * 2**30
    return avail / 4


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


# The bank also remembers the good layers mirrored left-right, top-bottom and both: parts,
# outlines and hatching of the mirrored orientations then look familiar on new jobs. Mirrors
# keep horizontal lines horizontal (recoater streaks keep their direction; 90-degree turns
# would not).
MIRRORS = ((), (-1,), (-2,), (-2, -1))


def _mirror(x, dims: tuple[int, ...]):
    if not dims:
        return x
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(np.flip(x, axis=dims))
    return torch.flip(x, dims=dims)


def _stack(views: list, select) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and cell weights of the selected layers, all views concatenated."""
    return torch.cat([f[select] for f, _ in views]), torch.cat([c[select] for _, c in views])


def calibration_folds(items: list[Item], images: np.ndarray, k: int) -> np.ndarray:
    """One fold per job when the good layers come from 2 or more jobs (a threshold for new
    jobs), else ``k`` contiguous folds of the layer sequence."""
    jobs = [it.job for it in items]
    if None not in jobs and len(set(jobs)) >= 2:
        order = {j: i for i, j in enumerate(dict.fromkeys(jobs))}
        log.info("calibrating on %d jobs, each scored by a model fitted on the others", len(order))
        return np.array([order[j] for j in jobs])
    return fold_ids(images, min(k, len(items)))


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


def cell_weights(
    net: NormalNet, items: list[Item], data: Any, grid, native, use_parts: bool
) -> torch.Tensor:
    """Per layer and map cell (N, h, w): 0 outside the ROI, 1 on powder, 2 on a part or its
    outline (from part masks, where the user has them)."""
    n = len(items)
    roi = net.roi[0, 0] if net.roi is not None else torch.ones(tuple(grid))
    cells = roi.expand(n, *grid).clone()
    parts = part_masks(items, data, native) if use_parts else None
    if parts is None:
        return cells
    for i, mask in enumerate(parts):
        if mask is not None:
            on_part = torch.from_numpy(_part_cells(mask, tuple(grid)))
            cells[i][on_part & (cells[i] > 0)] = 2.0
    return cells


def part_masks(items: list[Item], data: Any, native) -> list[np.ndarray | None] | None:
    """``ROOT/_parts/<layer file name>`` for each layer (None where absent); None if none."""
    folder = Path(data.root).expanduser() / "_parts" if data.get("root") else None
    if folder is None or not folder.is_dir():
        return None
    masks = []
    for it in items:
        path = folder / Path(it.path).name
        masks.append(_read_part_mask(path, it.path) if path.is_file() else None)
    found = sum(m is not None for m in masks)
    log.info("part masks for %d of %d good layers (%s)", found, len(items), folder)
    return masks if found else None


def _read_part_mask(path: Path, layer: Path) -> np.ndarray:
    mask = read_image(path, 1)
    size = _image_size(Path(layer))
    if mask.shape[:2] != size:
        raise InspectError(
            f"part mask {str(path)!r} is {mask.shape[1]}x{mask.shape[0]} but its layer "
            f"{str(layer)!r} is {size[1]}x{size[0]}: part masks must have their layer's size"
        )
    return mask > 127


def _part_cells(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Cells that a part touches, grown by one cell so its outline counts as part."""
    h, w = grid
    frac = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    return cv2.dilate((frac > 0).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0


def fit_scorer(
    scorer: torch.nn.Module, feats: torch.Tensor, cells: torch.Tensor, nc: Any, seed: int
) -> None:
    """Fit ``scorer`` (Gaussian or memory bank) on the patches of ``feats`` inside the ROI."""
    patches, kind = _patches(feats), cells.reshape(-1)
    if nc.method == "gaussian":
        mean, whiten = shrunk_gaussian(patches[kind > 0], nc.shrinkage)
        scorer.set_stats(mean, whiten)
        return
    size = scorer.bank.shape[0]
    parts = kind == 2
    n_part = min(int(parts.sum()), round(size * nc.part_share)) if parts.any() else 0
    bank = [_coreset(patches[kind == 1], size - n_part, nc.coreset_pool, seed)]
    if n_part:
        bank.append(_coreset(patches[parts], n_part, nc.coreset_pool, seed))
    scorer.set_bank(torch.cat(bank))


def _coreset(patches: torch.Tensor, size: int, pool_size: int, seed: int) -> torch.Tensor:
    """``size`` rows: a greedy coreset of a random pool of ``pool_size`` of ``patches``."""
    gen = torch.Generator().manual_seed(seed)
    pool = patches[torch.randperm(len(patches), generator=gen)[:pool_size]]
    bank = pool[greedy_coreset(pool, size, seed)]
    if len(bank) < size:  # fewer good patches than bank slots: repeat some
        bank = bank[torch.arange(size) % len(bank)]
    return bank


def out_of_fold_scores(
    net: NormalNet, views: list, folds: np.ndarray, nc: Any, seed: int
) -> np.ndarray:
    """Layer distance of every good layer (as it is, unmirrored) under a scorer fitted
    without its fold. ``views``: (features, cell weights) of the layers, then their mirrors."""
    scores = np.empty(len(folds))
    for f in sorted(set(folds.tolist())):
        held = torch.from_numpy(folds == f)
        fit_scorer(net.scorer, *_stack(views, ~held), nc, seed)
        scores[held.numpy()] = _layer_distances(net, views[0][0][held]).numpy()
    return scores


def _layer_distances(net: NormalNet, feats: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """What ``net.distances`` gives, from features already extracted."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(feats), batch):
            out.append(net.layer_distance(net.post_process(net.scorer(feats[i : i + batch]))))
    return torch.cat(out)


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


def _save(cfg, out_dir, net, pre, items, oof, folds, calib, roi, cells, peak) -> Path:
    config = OmegaConf.to_container(cfg, resolve=True)
    oof_frr = (oof >= calib["distance_threshold"]).mean()
    metrics = {
        "mode": "normal_only",
        "n": len(items),
        "n_normal": len(items),
        "n_defect": 0,
        "n_folds": len(set(folds.tolist())),
        "folds_by": "job" if len(set(folds.tolist())) > 1 and _by_job(items) else "block",
        "input_size": [pre.height, pre.width],
        "roi": roi,
        "bank": {
            "size": int(net.scorer.bank.shape[0]) if hasattr(net.scorer, "bank") else 0,
            "part_cells": int((cells == 2).sum()),
            "powder_cells": int((cells == 1).sum()),
        },
        "peak_rss_mb": round(peak, 1),
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
        "model": {"_target_": BUILDER, **_model_node(cfg, roi)},
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


def _by_job(items: list[Item]) -> bool:
    jobs = [it.job for it in items]
    return None not in jobs and len(set(jobs)) >= 2


def _summary(calib: dict, n: int) -> str:
    lo, hi = calib["frr_ci95"]
    return (
        f"normal-only model from {n} good layers: distance threshold "
        f"{calib['distance_threshold']:.4g} for target FRR {calib['target_frr']:.1%}; expected "
        f"FRR {calib['expected_frr']:.1%} (95% interval {lo:.1%}-{hi:.1%}, "
        f"{calib['n_calibration']} out-of-fold layers)"
    )
