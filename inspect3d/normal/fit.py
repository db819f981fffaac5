"""``fit_normal(cfg, out_dir) -> (summary, checkpoint path)``: a model from good layers only.

1. Read the layers of ``data.normal_class`` (other classes are ignored) and preprocess them,
   by default at their own (native) size, aspect kept: thin streaks stay a few pixels wide.
2. The region of interest (``normal.roi``: the build plate; ``auto`` finds it).
3. Frozen EfficientNet-Lite0 patch features (``inspect3d.normal.features``), in batches sized
   to the memory at hand.
4. Cross-fitting (``normal.calib_by``): every good layer is scored by scorers fitted without
   it, as a new job's layers will be. With layers of two or more jobs, one fold per job (at
   most ``normal.calib_folds``): each job is scored by a scorer that saw none of it. With one
   job, by regions: the layers are cut into ``normal.calib_grid`` x ``calib_grid`` regions and
   each region of every layer is scored by a scorer fitted on the other regions of all layers,
   so its parts are shapes at places the scorer never saw (a new job's parts are; contiguous
   blocks of one job's layers share their parts and set a threshold new jobs exceed). These
   out-of-fold scores set the threshold for ``normal.target_frr``; its expected false-reject
   rate and 95% interval follow from the order statistic (Beta distribution).
5. The final scorer is fitted on all good layers (and their mirrored and rotated views,
   sampled: ``inspect3d.normal.views``), in whitened features by default. With part masks
   (``ROOT/_parts/<layer file name>``, white = part), part and part-outline patches get their
   own share of the memory bank, so parts of every shape seen are remembered next to plain powder.
6. The checkpoint has the supervised format, so ``inspect3d export``/``eval`` work unchanged.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from inspect3d.data.layers import load_layers
from inspect3d.data.manifest import Item
from inspect3d.data.parts import PARTS_DIR, part_cells, read_part_mask
from inspect3d.data.preprocess import Preprocess, image_size, read_image
from inspect3d.data.sources import load_items, preprocess_of
from inspect3d.errors import InspectError
from inspect3d.io import write_json_atomic
from inspect3d.metrics import order_statistic_frr
from inspect3d.models.checkpoint import config_hash, save_checkpoint
from inspect3d.models.device import batch_for_memory, peak_rss_mb, resolve_device
from inspect3d.normal.patch import BUILDER, NormalNet, build_normal_net
from inspect3d.normal.roi import auto_roi, parse_roi
from inspect3d.normal.stats import (
    at_most,
    greedy_coreset,
    layer_order_threshold,
    shrunk_gaussian,
)
from inspect3d.normal.views import (
    PatchTable,
    concat,
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

log = logging.getLogger(__name__)
DEFECT_CLASS = "defect"
MIN_LAYERS = 5
RESOLUTIONS = ("native", "data")
CALIB_BY = ("auto", "job", "region", "block")
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
    parts = part_masks(items, cfg.data, native) if nc.use_parts else None
    node = _model_node(cfg, roi, part_bank_size(nc, parts))
    net = build_normal_net(2, pre, **node)
    device = resolve_device(nc.device)
    batch = batch_size_for(pre, nc)
    cells = cell_weights(net, parts, len(items), net.features.grid(*pre.size))
    feats, table = good_patches(net, images, cells, nc, batch, device, cfg.seed)
    pixel = fit_pixel_evidence(net, images, cells, batch)
    folds = calibration_folds(items, images, nc)
    if folds is None:
        oof = out_of_region_scores(net, feats, cells, table, nc, cfg.seed, pixel)
    else:
        oof = out_of_fold_scores(net, feats, cells, table, folds, nc, cfg.seed, pixel)
    fit_banks(net, table, nc, cfg.seed)
    calib = calibrate(net, oof, nc.target_frr)
    peak = peak_rss_mb()
    log.info("fit-normal peak memory %s MB", "unknown" if peak is None else round(peak))
    fitted = Fitted(net, node, pre, items, cells, oof, folds, calib, peak)
    return _summary(calib, len(items)), _save(cfg, out_dir, fitted)


@dataclass(frozen=True)
class Fitted:
    """A fitted and calibrated normal-only network, with what it was fitted on."""

    net: NormalNet
    node: dict  # the builder's arguments (the checkpoint's model node)
    pre: Preprocess
    items: list[Item]  # the good layers
    cells: torch.Tensor  # their cell weights (0 outside the ROI, 1 powder, 2 part)
    oof: np.ndarray  # out-of-fold layer distances
    folds: np.ndarray | None  # calibration fold per layer (None: folds of regions)
    calib: dict
    peak_mb: float | None


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
    if not isinstance(cfg.normal.rotations, int) or cfg.normal.rotations < 0:
        raise InspectError(
            f"normal.rotations={cfg.normal.rotations!r} is not valid: use 0 (none) or more "
            f"evenly spaced angles, e.g. 4"
        )
    if cfg.normal.calib_folds < 2:
        raise InspectError(
            f"normal.calib_folds={cfg.normal.calib_folds!r} is not valid: use 2 or more"
        )
    if cfg.normal.residual and cfg.normal.method != "patchcore":
        raise InspectError(
            f"normal.residual=true is not valid with normal.method={cfg.normal.method!r}: "
            "residual channels are judged by the memory bank (use normal.method=patchcore)"
        )
    if cfg.normal.residual and cfg.normal.use_parts:
        raise InspectError(
            "normal.residual=true is not valid with normal.use_parts=true: with part masks the "
            "residual channels flagged 63/98 clean layers of new jobs (docs/quality.md, "
            "implanted); use one of the two"
        )
    if not cfg.normal.residual_weight > 0:
        raise InspectError(
            f"normal.residual_weight={cfg.normal.residual_weight!r} is not valid: use a number "
            "above 0 (1: the residual and the deep distance count alike)"
        )
    if not 0.0 <= cfg.normal.pixel_weight < 1.0:
        raise InspectError(
            f"normal.pixel_weight={cfg.normal.pixel_weight!r} is not valid: use a number in "
            "[0, 1) (0: the deep distance alone, the default; 0.2: as measured in docs/quality.md)"
        )
    if cfg.normal.calib_by not in CALIB_BY:
        raise InspectError(
            f"normal.calib_by={cfg.normal.calib_by!r} is not valid: use one of {CALIB_BY}"
        )
    if not isinstance(cfg.normal.calib_grid, int) or cfg.normal.calib_grid < 2:
        raise InspectError(
            f"normal.calib_grid={cfg.normal.calib_grid!r} is not valid: use 2 or more "
            "(regions per side of the layer)"
        )


def part_bank_size(nc: Any, parts: list | None) -> int:
    """Rows of the part memory: ``normal.part_share`` of the bank when part masks are given."""
    if parts is None or nc.method != "patchcore":
        return 0
    return max(1, round(nc.bank_size * nc.part_share))


def _model_node(cfg: Any, roi: list | None, part_bank: int = 0) -> dict:
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
        "part_bank_size": part_bank,
        "whiten": bool(nc.whiten),
        "residual": bool(nc.residual),
        "pixel_weight": float(nc.pixel_weight),
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
    return batch_for_memory(pre, nc.batch_size, nc.memory_gb)


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


def good_patches(
    net: NormalNet, images: np.ndarray, cells: torch.Tensor, nc: Any, batch: int, device, seed: int
) -> tuple[torch.Tensor, PatchTable]:
    """Features of the good layers as they are (N, C, h, w), and the table of patches sampled
    from them and from their mirrored and rotated views (``inspect3d.normal.views``)."""
    transforms = view_transforms(nc.mirror, nc.rotations)
    cap = per_view_cap(nc.coreset_pool, len(images), len(transforms))
    gen = torch.Generator().manual_seed(seed)
    regions = region_ids(1, tuple(cells.shape[1:]), nc.calib_grid)  # alike for every layer
    tables, plain = [], None
    for dims, degrees in transforms:
        layers = rotate_layers(mirror(images, dims), degrees)
        view = extract(net, layers, batch, device, nc.progress)
        plain = view if plain is None else plain
        view_cells = rotate_cells(mirror(cells, dims), degrees)
        view_regions = turn_ids(mirror(regions, dims), degrees).expand(len(images), -1, -1)
        tables.append(sample_patches(view, view_cells, view_regions, cap, gen))
    log.info("%d views of each good layer in the bank's patch table", len(transforms))
    return plain, concat(tables)


def calibration_split(items: list[Item], calib_by: str) -> str:
    """``job``, ``region`` or ``block``: what the calibration folds hold (``auto``: whole jobs
    when the good layers come from 2 or more, else regions of the layers)."""
    if calib_by == "auto":
        return "job" if _by_job(items) else "region"
    if calib_by == "job" and not _by_job(items):
        raise InspectError(
            "normal.calib_by=job needs good layers of 2 or more known jobs; these come from "
            f"{len({it.job for it in items})}: use normal.calib_by=auto, region or block"
        )
    return calib_by


def calibration_folds(items: list[Item], images: np.ndarray, nc: Any) -> np.ndarray | None:
    """Fold of each layer: whole jobs (at most ``normal.calib_folds`` folds, each scored as
    new jobs are: by a scorer that saw none of its jobs) or contiguous blocks of the layer
    sequence; None for the region split (``out_of_region_scores``)."""
    split = calibration_split(items, nc.calib_by)
    if split == "region":
        log.info(
            "calibrating on %d regions of the layers, each scored by a model fitted on the others",
            nc.calib_grid**2,
        )
        return None
    if split == "job":
        order = {j: i for i, j in enumerate(dict.fromkeys(it.job for it in items))}
        n_folds = min(len(order), nc.calib_folds)
        log.info(
            "calibrating on %d jobs in %d folds, each scored by a model fitted on the others",
            len(order), n_folds,
        )  # fmt: skip
        return np.array([order[it.job] * n_folds // len(order) for it in items])
    return fold_ids(images, min(nc.calib_folds, len(items)))


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


def cell_weights(net: NormalNet, parts: list | None, n: int, grid) -> torch.Tensor:
    """Per layer and map cell (N, h, w): 0 outside the ROI, 1 on powder, 2 on a part or its
    outline (from part masks, where the user has them)."""
    roi = net.roi[0, 0] if net.roi is not None else torch.ones(tuple(grid))
    cells = roi.expand(n, *grid).clone()
    for i, mask in enumerate(parts or []):
        if mask is not None:
            on_part = torch.from_numpy(part_cells(mask, tuple(grid)))
            cells[i][on_part & (cells[i] > 0)] = 2.0
    return cells


def part_masks(items: list[Item], data: Any, native) -> list[np.ndarray | None] | None:
    """``ROOT/_parts/<layer file name>`` for each layer (None where absent); None if none."""
    folder = Path(data.root).expanduser() / PARTS_DIR if data.get("root") else None
    if folder is None or not folder.is_dir():
        return None
    masks = []
    for it in items:
        path = folder / Path(it.path).name
        masks.append(read_part_mask(path, _image_size(Path(it.path))) if path.is_file() else None)
    found = sum(m is not None for m in masks)
    log.info("part masks for %d of %d good layers (%s)", found, len(items), folder)
    return masks if found else None


def fit_banks(net: NormalNet, table: PatchTable, nc: Any, seed: int) -> None:
    """Fit the scorer (Gaussian or memory bank) on the good patches of ``table``; with a part
    memory, powder and part patches fill their own banks. Bank features are whitened first
    when the net has a ``Whiten`` (statistics of the powder patches); residual channels, if
    any, are kept as they are and scaled by the bank."""
    patches, kind = table.patches, table.kinds
    if nc.method == "gaussian":
        net.scorer.set_stats(*shrunk_gaussian(patches, nc.shrinkage))
        return
    deep, weight = net.scorer.channels, nc.residual_weight
    if net.whiten is not None:
        powder = patches[kind == 1] if (kind == 1).any() else patches
        pool = _pool(powder, nc.coreset_pool, seed)[:, :deep]
        mean, whiten = shrunk_gaussian(pool, nc.shrinkage)
        net.whiten.set_stats(mean, whiten)
        patches = torch.cat([(patches[:, :deep] - mean) @ whiten, patches[:, deep:]], dim=1)
    if net.part_scorer is None:
        net.scorer.set_bank(*_coreset(patches, len(net.scorer.bank), nc, seed, deep), weight)
        return
    net.scorer.set_bank(*_coreset(patches[kind == 1], len(net.scorer.bank), nc, seed, deep), weight)
    parts = patches[kind == 2]
    if len(parts) == 0:  # no part in these layers: the part memory holds powder
        parts = patches[kind == 1]
    net.part_scorer.set_bank(*_coreset(parts, len(net.part_scorer.bank), nc, seed, deep), weight)


def _pool(patches: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """At most ``size`` of ``patches``, drawn at random."""
    gen = torch.Generator().manual_seed(seed)
    return patches[torch.randperm(len(patches), generator=gen)[:size]]


SCALE_SAMPLE = 20000  # good patches that set a bank's residual scales and weight


def _coreset(
    patches: torch.Tensor, size: int, nc: Any, seed: int, deep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` rows: a greedy coreset (over the first ``deep`` channels) of a random pool of
    ``normal.coreset_pool`` patches; and a sample of the pool for the bank's scales."""
    if len(patches) == 0:
        raise InspectError("no good patch inside normal.roi: give a larger region of interest")
    pool = _pool(patches, nc.coreset_pool, seed)
    bank = pool[greedy_coreset(pool[:, :deep], size, seed)]
    if len(bank) < size:  # fewer good patches than bank slots: repeat some
        bank = bank[torch.arange(size) % len(bank)]
    return bank, pool[:SCALE_SAMPLE]


def fit_pixel_evidence(
    net: NormalNet, images: np.ndarray, cells: torch.Tensor, batch: int
) -> torch.Tensor | None:
    """Set the pixel evidence's units from the good layers' cells inside the ROI (``cells`` >
    0) and return its maps of those layers (N, 1, h, w); None for a net without it."""
    if net.pixel is None:
        return None
    with torch.inference_mode():
        res = torch.cat(
            [net.pixel.responses(torch.from_numpy(images[i : i + batch]))
             for i in range(0, len(images), batch)]
        )[..., : cells.shape[1], : cells.shape[2]]  # fmt: skip
        net.pixel.set_scale(res, cells > 0)
        return net.pixel.evidence(res)


def out_of_fold_scores(
    net: NormalNet,
    feats: torch.Tensor,
    cells: torch.Tensor,
    table: PatchTable,
    folds: np.ndarray,
    nc: Any,
    seed: int,
    pixel: torch.Tensor | None = None,
) -> np.ndarray:
    """Layer distance of every good layer (as it is: ``feats``, ``cells``) under a scorer
    fitted without its fold's patches. With a part memory, the out-of-fold distances also set
    the part scale. ``pixel``: the layers' pixel evidence (needs no folds: it has no memory)."""
    powder, part = [None] * len(folds), [None] * len(folds)
    for f in sorted(set(folds.tolist())):
        held = np.flatnonzero(folds == f)
        fit_banks(net, table.without(held), nc, seed)
        with torch.inference_mode():
            for i in held:
                powder[i], part[i] = net.raw_maps(feats[i : i + 1])
    powder = torch.cat(powder)
    part = None if net.part_scorer is None else torch.cat(part)
    return _layer_distances(net, powder, part, cells, pixel)


def out_of_region_scores(
    net: NormalNet,
    feats: torch.Tensor,
    cells: torch.Tensor,
    table: PatchTable,
    nc: Any,
    seed: int,
    pixel: torch.Tensor | None = None,
) -> np.ndarray:
    """Layer distance of every good layer, each region of its map (``normal.calib_grid``)
    measured by a scorer fitted on the patches of the other regions of all layers (and of
    their views): the stitched maps are what the layers' parts and powder would score at
    places the scorer had never seen them."""
    powder, part = torch.zeros(len(feats), 1, *feats.shape[-2:]), None
    if net.part_scorer is not None:
        part = torch.zeros_like(powder)
    for i, (rows, cols) in enumerate(region_boxes(tuple(feats.shape[-2:]), nc.calib_grid)):
        fit_banks(net, table.outside(i), nc, seed)
        with torch.inference_mode():
            for j in range(len(feats)):
                pw, pt = net.raw_maps(feats[j : j + 1, :, rows, cols])
                powder[j, :, rows, cols] = pw[0]
                if part is not None:
                    part[j, :, rows, cols] = pt[0]
    return _layer_distances(net, powder, part, cells, pixel)


def _layer_distances(
    net: NormalNet,
    powder: torch.Tensor,
    part: torch.Tensor | None,
    cells: torch.Tensor,
    pixel: torch.Tensor | None = None,
) -> np.ndarray:
    """Out-of-fold raw maps -> layer distances (setting the part scale first, if any)."""
    if part is not None:
        net.part_scale.fill_(part_scale(powder, part, cells))
    with torch.inference_mode():
        dmap = net.post_process(net.combine(powder, part, _part_input(cells)), pixel)
        return net.layer_distance(dmap).numpy()


def _part_input(cells: torch.Tensor) -> torch.Tensor:
    """Cell weights (N, h, w) -> the part-cell input of the network (N, 1, h, w), 1 = part."""
    return (cells == 2).float()[:, None]


PART_QUANTILE = 0.99


def part_scale(powder: torch.Tensor, part: torch.Tensor, cells: torch.Tensor) -> float:
    """How much farther good part patches lie from the part memory than good powder patches
    from the memories (their 99th percentiles, out of fold): part distances are divided by it,
    so a part is flagged when it is as unusual among parts as a defect among powder."""
    on_part, on_powder = cells[:, None] == 2, cells[:, None] == 1
    if not on_part.any() or not on_powder.any():
        return 1.0
    union = torch.minimum(powder, part)
    q_part = torch.quantile(at_most(part[on_part]), PART_QUANTILE)
    q_powder = torch.quantile(at_most(union[on_powder]), PART_QUANTILE)
    scale = float(q_part / q_powder.clamp_min(1e-6))
    log.info("part distances scaled by 1/%.3f (99th percentiles, out of fold)", scale)
    return max(scale, 1e-3)


def calibrate(net: NormalNet, oof: np.ndarray, target_frr: float) -> dict:
    """Set the net's distance threshold and temperature; return the calibration record."""
    threshold, n_allowed = layer_order_threshold(oof, target_frr)
    temperature = max(float(np.std(oof)), 1e-3 * abs(threshold), 1e-6)
    net.threshold.fill_(threshold)
    net.temperature.fill_(temperature)
    record = {
        "method": f"out-of-fold order statistic ({n_allowed} of {len(oof)} good layers above)",
        "target_frr": float(target_frr),
        **order_statistic_frr(len(oof), n_allowed),
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


def _save(cfg: Any, out_dir: Path, f: Fitted) -> Path:
    """checkpoint.pt (network, metadata, calibration) and metrics.json in ``out_dir``."""
    metrics = _metrics(cfg, f)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = save_checkpoint(
        out_dir / "checkpoint.pt",
        f.net,
        _meta(cfg, f),
        epoch=None,
        threshold=0.5,  # defect score 0.5 <=> distance at the calibrated threshold
        target_frr=float(cfg.normal.target_frr),
        calibration=f.calib,
        metrics=metrics,
        fit_layers=[str(it.path) for it in f.items],
    )
    write_json_atomic(
        out_dir / "metrics.json",
        {**metrics, "oof_scores": [float(v) for v in f.oof], "folds": _plain(f.folds)},
    )
    return path


def _metrics(cfg: Any, f: Fitted) -> dict:
    net, cells, oof = f.net, f.cells, f.oof
    return {
        "mode": "normal_only",
        "n": len(f.items),
        "n_normal": len(f.items),
        "n_defect": 0,
        "n_folds": cfg.normal.calib_grid**2 if f.folds is None else len(set(f.folds.tolist())),
        "folds_by": calibration_split(f.items, cfg.normal.calib_by),
        "input_size": [f.pre.height, f.pre.width],
        "roi": f.node["roi"],
        "bank": {
            "size": int(net.scorer.bank.shape[0]) if hasattr(net.scorer, "bank") else 0,
            "part_size": 0 if net.part_scorer is None else int(net.part_scorer.bank.shape[0]),
            "part_scale": float(net.part_scale),
            "part_cells": int((cells == 2).sum()),
            "powder_cells": int((cells == 1).sum()),
        },
        "peak_rss_mb": None if f.peak_mb is None else round(f.peak_mb, 1),
        "calibration": f.calib,
        "oof_distance": {
            "min": float(oof.min()),
            "median": float(np.median(oof)),
            "max": float(oof.max()),
        },
        "threshold": {
            "value": 0.5,
            "false_reject_rate": float((oof >= f.calib["distance_threshold"]).mean()),
        },
    }


def _meta(cfg: Any, f: Fitted) -> dict:
    config = OmegaConf.to_container(cfg, resolve=True)
    return {
        "mode": "normal_only",
        "model": {"_target_": BUILDER, **f.node},
        "classes": [cfg.data.normal_class, DEFECT_CLASS],
        "normal_class": cfg.data.normal_class,
        "preprocess": f.pre.to_dict(),
        "config": config,
        "config_hash": config_hash(config),
    }


def _plain(folds: np.ndarray | None) -> list | None:
    return None if folds is None else folds.tolist()


def _by_job(items: list[Item]) -> bool:
    """Calibration folds hold whole jobs: every layer's job is known and there are 2+."""
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
