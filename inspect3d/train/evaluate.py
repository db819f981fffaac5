"""``inspect3d eval``: score a trained run's checkpoint on held-out layers, honestly."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from inspect3d.data.layers import load_layers
from inspect3d.data.layout import list_images
from inspect3d.data.manifest import Item
from inspect3d.data.parts import PARTS_DIR, cells_from_masks
from inspect3d.data.preprocess import Preprocess, check_channels, read_image
from inspect3d.data.sources import load_data, load_items
from inspect3d.data.splits import assign_groups
from inspect3d.errors import InspectError
from inspect3d.io import write_json_atomic, write_text_atomic
from inspect3d.localisation import PEAK_RADIUS, PixelCurves, ScoreBins, peak_on_defect, resize_map
from inspect3d.metrics import (
    auroc,
    calibrate_threshold,
    cell_auroc,
    region_recall,
    summarize,
    wilson_interval,
)
from inspect3d.models import ScoringNet
from inspect3d.models.checkpoint import load_checkpoint, model_from_checkpoint
from inspect3d.models.device import autocast, batch_for_memory, peak_rss_mb, resolve_device
from inspect3d.train.plots import plot_confusion

log = logging.getLogger(__name__)
SPLITS = ("auto", "val", "all")


def evaluate_run(cfg: Any) -> dict:
    """Evaluate RUN/checkpoint.pt on the given data (or the run's own val split)."""
    run = Path(cfg.run)
    ckpt = load_checkpoint(run / "checkpoint.pt")
    items, groups, source = _eval_items(cfg, ckpt)
    classes = ckpt["classes"]
    normal_only = ckpt.get("mode") == "normal_only"
    labels = _labels(items, classes, source, ckpt["normal_class"] if normal_only else None)
    probs, maps = _predict(ckpt, items, labels, cfg)
    metrics = summarize(labels, probs, classes, 0, ckpt.get("threshold"), groups)
    normal = 1.0 - probs[labels == 0, 0]
    target = ckpt.get("target_frr", 0.05)
    metrics.update(
        source=source,
        run=str(run),
        mode=ckpt.get("mode", "supervised"),
        checkpoint_epoch=ckpt.get("epoch"),
        target_frr=target,
        threshold_for_target_frr=calibrate_threshold(normal, target) if normal.size else None,
        by_source_class=_by_source_class(items, ckpt["normal_class"], probs, ckpt.get("threshold")),
    )
    mask_root = (cfg.get("data") or {}).get("mask_root")
    if mask_root:
        metrics.update(mask_metrics(items, maps, Path(mask_root), ckpt.get("threshold") or 0.5))
    peak = peak_rss_mb()
    metrics["peak_rss_mb"] = None if peak is None else round(peak, 1)
    out = Path(cfg.out)
    write_json_atomic(out, metrics)
    _write_predictions(out.with_name(out.stem + "_predictions.csv"), items, probs, classes)
    plot_confusion(
        metrics["confusion_matrix"],
        classes,
        out.with_name(out.stem + "_confusion.png"),
        f"eval: {source}",
    )
    _log_summary(metrics, out)
    return metrics


def _eval_items(cfg: Any, ckpt: dict) -> tuple[list[Item], list[str], str]:
    split = cfg.get("split", "auto")
    if split not in SPLITS:
        raise InspectError(f"split={split!r} is not valid: use one of {SPLITS}")
    data_cfg = cfg.get("data")
    if data_cfg is None or split == "val":
        if ckpt.get("mode") == "normal_only":
            raise InspectError(
                "this run is a normal-only model (fit-normal): it has no validation split; "
                "pass the layers to evaluate, e.g. data=folder data.root=DIR data.normal_class=NAME"
            )
        trained = OmegaConf.create(ckpt["config"])
        data = load_data(data_cfg or trained.data, trained.seed)
        items = [data.items[i] for i in data.val]
        return (
            items,
            [data.groups[i] for i in data.val],
            f"validation split of {(data_cfg or trained.data).root}",
        )
    items = load_items(data_cfg)
    model_channels = int(ckpt["preprocess"]["channels"])
    if data_cfg.get("channels") not in (None, model_channels):
        raise InspectError(
            f"data.channels={data_cfg.channels} but the model takes "
            f"{model_channels}-channel layers: drop data.channels or pass {model_channels}"
        )
    if data_cfg.get("channels") is None:  # data.channels=<the model's> converts them anyway
        check_channels(model_channels, [it.path for it in items], repr(str(data_cfg.root)))
    if data_cfg.normal_class != ckpt["normal_class"]:
        raise InspectError(
            f"data.normal_class={data_cfg.normal_class!r} but the model's normal class is "
            f"{ckpt['normal_class']!r}: pass data.normal_class={ckpt['normal_class']}"
        )
    return items, assign_groups(items, 1, data_cfg.block_size), f"all layers of {data_cfg.root}"


def _labels(
    items: list[Item], classes: list[str], source: str, normal_only: str | None = None
) -> np.ndarray:
    """Class index per item; for a normal-only model (``normal_only`` = its normal class) every
    other class counts as defect (index 1)."""
    if normal_only is not None:
        return np.array([0 if it.label == normal_only else 1 for it in items])
    unknown = sorted({it.label for it in items} - set(classes))
    if unknown:
        raise InspectError(
            f"classes {unknown} in {source} are unknown to the model, which knows {classes}; "
            "rename or remove those folders"
        )
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[it.label] for it in items])


def _predict(
    ckpt: dict, items: list[Item], labels: np.ndarray, cfg: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N, K) and defect maps (N, h, w), as the exported model gives them
    (a normal-only model fitted with part masks gets each layer's ``ROOT/_parts`` mask)."""
    device = resolve_device(cfg.get("device", "auto"))
    net = ScoringNet(model_from_checkpoint(ckpt)).to(device).eval()
    pre = Preprocess.from_dict(ckpt["preprocess"])
    images = load_layers(items, pre)
    cells = _part_cells(net, items, cfg, pre)
    batch = batch_for_memory(pre, cfg.get("batch_size", 16))
    probs, maps = [], []
    with torch.inference_mode():
        for i in tqdm(range(0, len(images), batch), desc="evaluating", leave=False):
            x = torch.from_numpy(images[i : i + batch]).to(device)
            extra = () if cells is None else (torch.from_numpy(cells[i : i + batch]).to(device),)
            with autocast(device, device.type == "cuda"):
                p, m = net(x, *extra)
            probs.append(p.float().cpu())
            maps.append(m.float().cpu()[:, 0])
    return torch.cat(probs).numpy(), torch.cat(maps).numpy()


def _part_cells(net: ScoringNet, items: list[Item], cfg: Any, pre: Preprocess):
    """Part cells (N, 1, h, w) from ``DATA_ROOT/_parts/<layer file name>`` for a model with a
    part memory; None otherwise (layers without a mask get none)."""
    inner = net.net
    root = cfg.get("data", {}).get("root") if cfg.get("data") else None
    if getattr(inner, "part_scorer", None) is None or not root:
        return None
    folder = Path(root).expanduser() / PARTS_DIR
    grid = inner.features.grid(pre.height, pre.width)
    masks = [m if (m := folder / Path(it.path).name).is_file() else None for it in items]
    log.info("part masks for %d of %d layers (%s)", sum(m is not None for m in masks), len(items),
             folder)  # fmt: skip
    return cells_from_masks(masks, grid)


def _by_source_class(
    items: list[Item], normal_class: str, probs: np.ndarray, threshold: float | None
) -> dict:
    """Per folder class: N, share flagged at the threshold, AUROC against the normal layers."""
    score = 1.0 - probs[:, 0]
    labels = np.array([it.label for it in items])
    normal = labels == normal_class
    out = {}
    for c in sorted(set(labels.tolist())):
        sel = labels == c
        both = normal | sel
        out[c] = {
            "n": int(sel.sum()),
            "flagged": float((score[sel] >= threshold).mean()) if threshold is not None else None,
            "auroc_vs_normal": None if c == normal_class else auroc(sel[both], score[both]),
        }
    return out


# --- defect masks: localisation figures of the defect map ------------------------------------

CELL_AUROC_NOTE = (
    "AUROC of defect-map grid cells against 'any mask pixel in the cell', all cells pooled; "
    "not the standard pixel AUROC (that is pixel_auroc, at each layer's own resolution)"
)


INTERVAL_NOTE = (
    "95% percentile bootstrap over jobs (a layer without a job is its own group), "
    "1000 resamples; null with fewer than 2 groups"
)


def mask_metrics(items: list[Item], maps: np.ndarray, mask_root: Path, threshold: float) -> dict:
    """Localisation figures of the defect maps against defect masks.

    The mask of layer ``ROOT/<class>/<stem>.<ext>`` is ``mask_root/<class>/<stem>.*`` or else
    ``mask_root/<stem>.*`` (any image extension; any non-zero pixel is defect); a layer without
    one has no defect pixels. Each map is resized bilinearly to its layer's own image size and
    compared pixel by pixel, one layer at a time (see ``inspect3d.localisation``):
    ``pixel_auroc``, ``aupro_30`` (MVTec AD's per-region overlap up to 30% FPR) and
    ``peak_on_defect``, with ``*_ci95`` bootstrap intervals over jobs. On the defect-map grid,
    as before: ``cell_auroc`` (a cell is defect when any of its pixels is) and
    ``region_recall`` (an 8-connected mask region counts as found when the map reaches
    ``threshold`` in one of its cells).
    """
    found = _masks_for(items, mask_root)
    grid = maps.shape[1:]
    curves = PixelCurves(ScoreBins.from_sample(maps))
    cells, regions, peaks, resized = [], [], [], 0
    layers = zip(items, maps, found, strict=True)
    for item, dmap, path in tqdm(layers, total=len(items), desc="mask figures", leave=False):
        size = read_image(item.path, 1).shape[:2]  # the layer's own size, as decoded for the model
        mask, was_resized = _read_mask(path, size)
        resized += was_resized
        full = resize_map(dmap, size)
        curves.add(full, mask, group=item.job or str(item.path))
        peaks.append(None if mask is None else peak_on_defect(full, mask))
        layer_cells, layer_regions = _mask_on_grid(mask, grid)
        cells.append(layer_cells)
        regions.append(layer_regions)
    if resized:
        log.warning("%d mask(s) differ in size from their layer: resized (nearest) to it", resized)
    recall, n_found, n_regions = region_recall(maps, regions, threshold)
    spread = curves.intervals(0.3)
    return {
        "pixel_auroc": curves.pixel_auroc(),
        "pixel_auroc_ci95": spread["pixel_auroc_ci95"],
        "aupro_30": curves.aupro(0.3),
        "aupro_30_ci95": spread["aupro_ci95"],
        "interval_groups": spread["n_groups"],
        "interval_note": INTERVAL_NOTE,
        "peak_on_defect": _peak_summary(peaks),
        "cell_auroc": cell_auroc(maps, np.stack(cells)),
        "cell_auroc_note": CELL_AUROC_NOTE,
        "region_recall": recall,
        "n_regions": n_regions,
        "n_regions_found": n_found,
        "region_threshold": float(threshold),
        "n_pixels": int(curves.clean.sum() + curves.defect.sum()),
        "n_defect_pixels": int(curves.defect.sum()),
        "n_masks": int(sum(m is not None for m in found)),
        "n_masks_resized": int(resized),
        "mask_root": str(mask_root),
        "defect_map_grid": list(grid),
    }


def _masks_for(items: list[Item], mask_root: Path) -> list[Path | None]:
    index = _mask_index(mask_root)
    found = [_find_mask(index, it) for it in items]
    if not any(found):
        raise InspectError(
            f"no mask in data.mask_root={str(mask_root)!r} matches a layer: masks need the layer's "
            f"file stem (e.g. {items[0].path.stem!r}.png), directly in it or in a class sub-folder"
        )
    return found


def _mask_index(mask_root: Path) -> dict[str, Path]:
    if not mask_root.is_dir():
        raise InspectError(
            f"data.mask_root={str(mask_root)!r} is not a folder: point it at the folder of "
            "defect masks (same file stem as each layer, non-zero pixels = defect)"
        )
    index: dict[str, Path] = {}
    for path in list_images(mask_root, recursive=True):
        rel = path.relative_to(mask_root)
        key = rel.stem if len(rel.parts) == 1 else f"{rel.parent.as_posix()}/{rel.stem}"
        index.setdefault(key, path)
    return index


def _find_mask(index: dict[str, Path], item: Item) -> Path | None:
    return index.get(f"{item.label}/{item.path.stem}") or index.get(item.path.stem)


def _read_mask(path: Path | None, size: tuple[int, int]) -> tuple[np.ndarray | None, bool]:
    """Binary uint8 mask (1 = defect) at ``size`` (height, width), and whether it was resized."""
    if path is None:
        return None, False
    binary = (read_image(path, 1) > 0).astype(np.uint8)
    if binary.shape == tuple(size):
        return binary, False
    h, w = size
    return cv2.resize(binary, (w, h), interpolation=cv2.INTER_NEAREST), True


def _mask_on_grid(
    mask: np.ndarray | None, grid: tuple[int, int]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Defect cells (h, w) and one boolean cell array per 8-connected region of ``mask``."""
    if mask is None:
        return np.zeros(grid, bool), []
    n, comp = cv2.connectedComponents(mask, connectivity=8)
    return _to_grid(mask > 0, grid), [_to_grid(comp == k, grid) for k in range(1, n)]


def _to_grid(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Area resize: a cell is set when any pixel in it is (area fraction > 0)."""
    h, w = grid
    return cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA) > 0


def _peak_summary(peaks: list[bool | None]) -> dict:
    """Hits, N, rate and Wilson 95% interval over the layers with defect pixels."""
    hits, n = sum(p is True for p in peaks), sum(p is not None for p in peaks)
    return {
        "hits": hits,
        "n": n,
        "rate": hits / n if n else None,
        "ci95": wilson_interval(hits, n),
        "radius_px": PEAK_RADIUS,
    }


def _write_predictions(
    path: Path, items: list[Item], probs: np.ndarray, classes: list[str]
) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "predicted", "defect_score", *[f"p_{c}" for c in classes]])
    for it, p in zip(items, probs, strict=True):
        w.writerow(
            [
                str(it.path),
                it.label,
                classes[int(p.argmax())],
                f"{1 - p[0]:.6f}",
                *[f"{v:.6f}" for v in p],
            ]
        )
    write_text_atomic(path, buf.getvalue())


def _log_summary(m: dict, out: Path) -> None:
    ci = m["ci95"].get("macro_f1")
    ci_txt = f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""
    auroc = "n/a" if m["auroc"] is None else f"{m['auroc']:.3f}"
    log.info(
        "N=%d (%d normal, %d defect): accuracy %.3f, macro-F1 %.3f%s, AUROC %s",
        m["n"],
        m["n_normal"],
        m["n_defect"],
        m["accuracy"],
        m["macro_f1"],
        ci_txt,
        auroc,
    )
    if "pixel_auroc" in m:
        _log_mask_summary(m)
    log.info("peak memory %s MiB; wrote %s", _fmt(m["peak_rss_mb"], ".0f"), out)


def _log_mask_summary(m: dict) -> None:
    peak = m["peak_on_defect"]
    log.info(
        "localisation over %d px, %d regions, %d jobs: pixel AUROC %s %s, AUPRO@30%%FPR %s %s, "
        "map peak within %g px of a defect on %d/%d defect layers",
        m["n_pixels"],
        m["n_regions"],
        m["interval_groups"],
        _fmt(m["pixel_auroc"]),
        _fmt_ci(m["pixel_auroc_ci95"]),
        _fmt(m["aupro_30"]),
        _fmt_ci(m["aupro_30_ci95"]),
        peak["radius_px"],
        peak["hits"],
        peak["n"],
    )
    log.info("cell AUROC %s: %s", _fmt(m["cell_auroc"]), m["cell_auroc_note"])


def _fmt_ci(ci: list[float] | None) -> str:
    return "(no interval)" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)
