"""``inspect3d eval``: score a trained run's checkpoint on held-out layers, honestly."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from inspect3d.data.manifest import Item
from inspect3d.data.preprocess import Preprocess
from inspect3d.data.sources import load_data, load_items
from inspect3d.data.splits import assign_groups
from inspect3d.errors import InspectError
from inspect3d.io import write_json_atomic, write_text_atomic
from inspect3d.metrics import calibrate_threshold, summarize
from inspect3d.train.checkpoint import load_checkpoint, model_from_checkpoint
from inspect3d.train.dataset import LayerDataset, load_layers
from inspect3d.train.loop import predict, resolve_device
from inspect3d.train.plots import plot_confusion

log = logging.getLogger(__name__)
SPLITS = ("auto", "val", "all")


def evaluate_run(cfg: Any) -> dict:
    """Evaluate RUN/checkpoint.pt on the given data (or the run's own val split)."""
    run = Path(cfg.run)
    ckpt = load_checkpoint(run / "checkpoint.pt")
    items, groups, source = _eval_items(cfg, ckpt)
    classes = ckpt["classes"]
    labels = _labels(items, classes, source)
    probs = _predict(ckpt, items, labels, cfg)
    metrics = summarize(labels, probs, classes, 0, ckpt.get("threshold"), groups)
    normal = 1.0 - probs[labels == 0, 0]
    target = ckpt.get("target_frr", 0.05)
    metrics.update(
        source=source,
        run=str(run),
        checkpoint_epoch=ckpt.get("epoch"),
        target_frr=target,
        threshold_for_target_frr=calibrate_threshold(normal, target) if normal.size else None,
    )
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
        trained = OmegaConf.create(ckpt["config"])
        data = load_data(data_cfg or trained.data, trained.seed)
        items = [data.items[i] for i in data.val]
        return (
            items,
            [data.groups[i] for i in data.val],
            f"validation split of {(data_cfg or trained.data).root}",
        )
    items = load_items(data_cfg)
    if data_cfg.normal_class != ckpt["normal_class"]:
        raise InspectError(
            f"data.normal_class={data_cfg.normal_class!r} but the model's normal class is "
            f"{ckpt['normal_class']!r}: pass data.normal_class={ckpt['normal_class']}"
        )
    return items, assign_groups(items, 1, data_cfg.block_size), f"all layers of {data_cfg.root}"


def _labels(items: list[Item], classes: list[str], source: str) -> np.ndarray:
    unknown = sorted({it.label for it in items} - set(classes))
    if unknown:
        raise InspectError(
            f"classes {unknown} in {source} are unknown to the model, which knows {classes}; "
            "rename or remove those folders"
        )
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[it.label] for it in items])


def _predict(ckpt: dict, items: list[Item], labels: np.ndarray, cfg: Any) -> np.ndarray:
    device = resolve_device(cfg.get("device", "auto"))
    model = model_from_checkpoint(ckpt).to(device)
    images = load_layers(items, Preprocess.from_dict(ckpt["preprocess"]))
    loader = torch.utils.data.DataLoader(
        LayerDataset(images, labels.tolist()), batch_size=cfg.get("batch_size", 16)
    )
    probs, _, _ = predict(
        model, loader, device, amp=device.type == "cuda", progress=True, desc="evaluating"
    )
    return probs


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
    log.info("wrote %s", out)
