"""PBLM 5-fold blocked CV: macro-F1 and defect AUROC of CNNs beside shortcut baselines.

Jobs are unknown in PBLM, so each class folder's layers are cut into contiguous blocks, whole
blocks are dealt to folds and ``purge_gap`` neighbours of a held-out block leave training
(inspect3d.data.splits, settings from configs/data/pblm.yaml). Variants:

- ``per_image``: default model, per-image normalisation + brightness/contrast jitter;
- ``fixed``: default model, fixed normalisation, no jitter (may use the brightness shortcut);
- ``lite0``: ImageNet EfficientNet-Lite0, frozen, per-image normalised input, a trained head
  (``inspect3d train model=efficientnet_lite0 model.freeze=true``, lite0_probe.py);
- baselines (always run, cheap): brightness only; 1-NN on 16x16 thumbnails, raw and
  per-image normalised.

    python benchmarks/quality/pblm_cv.py [--root DIR] [--variants per_image,fixed,lite0] [--quick]

Results: docs/quality/pblm_cv.json and the ``pblm_cv`` section of docs/quality.md. Variants not
named keep their earlier results.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections import defaultdict
from pathlib import Path

import common
import numpy as np

from inspect3d.data.layers import load_layers
from inspect3d.data.manifest import class_list, scan_folder
from inspect3d.data.preprocess import Preprocess, resize

NAME = "pblm_cv"
CNN_VARIANTS = {
    "per_image": ["data.norm=per_image", "data.jitter=0.3"],
    "fixed": ["data.norm=fixed", "data.jitter=0.0"],
}
BASELINES = ("brightness", "nn_raw", "nn_norm")
LABELS = {
    "brightness": "brightness only (nearest class mean grey)",
    "nn_raw": "1-NN, 16x16 thumbnails, raw",
    "nn_norm": "1-NN, 16x16 thumbnails, per-image normalised",
    "per_image": "smallcnn, per-image norm + jitter",
    "fixed": "smallcnn, fixed norm (shortcut allowed)",
    "lite0": "EfficientNet-Lite0 ImageNet, frozen + trained head (model.freeze), per-image norm",
}


# ----------------------------------------------------------------------------------------------
# baselines on 16x16 thumbnails (the thumbnail mean is the layer's mean grey)


def duplicate_leaks(items, splits) -> dict:
    """Byte-identical files, and per fold how many held-out layers have a twin in training."""
    digest = [hashlib.sha256(it.path.read_bytes()).hexdigest() for it in items]
    twins: dict[str, list[int]] = defaultdict(list)
    for i, d in enumerate(digest):
        twins[d].append(i)
    pairs = [sorted(idx) for idx in twins.values() if len(idx) > 1]
    leaks = []
    for split in splits:
        train = set(split.train)
        leaks.append(sum(any(j in train for j in twins[digest[i]] if j != i) for i in split.val))
    names = [[f"{items[i].label}/{items[i].path.name}" for i in p] for p in pairs]
    return {"identical_groups": names, "held_out_with_twin_in_training": leaks}


def thumbnails(items, side: int = 16) -> np.ndarray:
    """16x16 grey thumbnails (the preprocessing's smallest input, then area-averaged again)."""
    grey = load_layers(items, Preprocess(height=4 * side, width=4 * side), progress=False)
    return np.stack([resize(g[0], side, side) for g in grey])


def thumbnail_features(thumbs: np.ndarray) -> dict[str, np.ndarray]:
    flat = thumbs.reshape(len(thumbs), -1).astype(np.float64)
    mean = flat.mean(1, keepdims=True)
    std = flat.std(1, keepdims=True) + 1.0
    return {"brightness": mean, "nn_raw": flat, "nn_norm": (flat - mean) / std}


# ----------------------------------------------------------------------------------------------
# CNN variants: inspect3d's own training per fold, then predictions on the held-out blocks


def cnn_predictions(root: Path, variant: str, fold: int, args) -> tuple[np.ndarray, dict]:
    cfg = common.compose_train(
        overrides(root, args) + [f"data.fold={fold}", *CNN_VARIANTS[variant]]
    )
    probs, metrics = common.train_and_predict(cfg, common.WORK / NAME / variant / f"fold{fold}")
    return probs, {"best_epoch": metrics["best_epoch"]}


def overrides(root: Path, args) -> list[str]:
    return [
        "data=pblm",
        f"data.root={root}",
        f"data.folds={args.folds}",
        f"data.height={args.size}",
        f"data.width={args.size}",
        f"data.subsample={args.subsample}",
        f"trainer.epochs={args.epochs}",
        "experiment=bench_cpu",  # configs/experiment/bench_cpu.yaml
        f"seed={common.SEED}",
    ]


# ----------------------------------------------------------------------------------------------
# driver


def run_variant(variant, cv, root, args, thumbs=None, feature_s: float = 0.0) -> dict:
    """Per-fold figures and pooled figures (all held-out layers, block bootstrap) of a variant;
    ``feature_s``: time already spent on its input (thumbnails)."""
    t0 = time.time() - feature_s
    feats = thumbnail_features(thumbs) if thumbs is not None else None

    def predict(fold: int, split) -> tuple[np.ndarray, dict]:
        extra: dict = {}
        if variant in BASELINES:
            k, centroid = len(cv.classes), variant == "brightness"
            p = common.baseline_predictions(feats[variant], cv.y, split, k, centroid=centroid)
        elif variant == "lite0":
            p, extra = lite0_predictions(root, fold, args)
        else:
            p, extra = cnn_predictions(root, variant, fold, args)
        n_normal = int((cv.y[split.val] == 0).sum())
        return p, {"n_normal": n_normal, "n_train": len(split.train), **extra}

    probs, per_fold = common.cross_validate(cv, variant, predict)
    return common.variant_result(LABELS[variant], per_fold, common.pooled_cv(cv, probs), t0)


def lite0_predictions(root: Path, fold: int, args) -> tuple[np.ndarray, dict]:
    """The frozen-Lite0 probe (``inspect3d train model.freeze=true``) on one fold, trained on
    every ``lite0_every``-th training layer (a backbone pass per layer is costly on a CPU)."""
    from lite0_probe import probe_predictions

    extra = [f"data.fold={fold}", f"data.subsample={args.lite0_every}", "data.norm=per_image"]
    probs, metrics = probe_predictions(
        overrides(root, args) + extra, common.WORK / NAME / "lite0" / f"fold{fold}"
    )
    return probs, {"best_epoch": metrics["best_epoch"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--root", type=Path, default=common.DATASETS / "pblm")
    ap.add_argument("--variants", default="per_image,fixed,lite0")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--subsample", type=int, default=8)
    ap.add_argument("--lite0-every", type=int, default=2, help="lite0: every n-th training layer")
    ap.add_argument("--quick", action="store_true", help="baselines only (seconds)")
    args = ap.parse_args()
    m = common.print_machine()
    items = scan_folder(args.root)
    cfg = common.compose_train(overrides(args.root, args))
    classes = class_list(items, cfg.data.normal_class)
    y = np.array([classes.index(it.label) for it in items])
    splits = common.kfold_splits(items, cfg, args.folds)
    results = common.load_results(common.RESULTS, NAME)
    results.setdefault("variants", {})
    results.update(machine=m, settings=settings(args, cfg), classes=classes)
    results["counts"] = {c: int((y == i).sum()) for i, c in enumerate(classes)}
    results["duplicates"] = duplicate_leaks(items, splits)
    t = time.time()
    thumbs = thumbnails(items)
    thumb_s = time.time() - t
    cv = common.CVSet(y, classes, splits)
    for v in BASELINES:
        results["variants"][v] = run_variant(v, cv, args.root, args, thumbs, thumb_s)
    for v in [] if args.quick else [s for s in args.variants.split(",") if s]:
        results["variants"][v] = run_variant(v, cv, args.root, args)
        results = common.merge_results(NAME, results, [v])
    results = common.merge_results(NAME, results, list(BASELINES))
    plot(results)
    text = section(results)
    common.update_section(NAME, text)
    print(text)


def settings(args, cfg) -> dict:
    d = cfg.data
    return {
        "folds": args.folds,
        "block_size": d.block_size,
        "purge_gap": d.purge_gap,
        "seed": cfg.seed,
        "size": args.size,
        "epochs": args.epochs,
        "subsample": args.subsample,
        "batch_size": 8,
        "lite0_every": args.lite0_every,
    }


# ----------------------------------------------------------------------------------------------
# report


ORDER = ("brightness", "nn_raw", "nn_norm", "fixed", "per_image", "lite0")


def section(r: dict) -> str:
    s = r["settings"]
    counts = ", ".join(f"{c} {n}" for c, n in r["counts"].items())
    rows = common.variant_rows(r, ORDER, LABELS, 7, _cells)
    n_normal = [f["n_normal"] for f in next(iter(r["variants"].values()))["per_fold"]]
    p0 = next(iter(r["variants"].values()))["pooled"]
    return "\n".join(
        [
            f"## PBLM: {s['folds']}-fold blocked CV, macro-F1 and defect AUROC",
            "",
            f"N = {p0['n']} layers ({counts}), {p0['n_groups']} blocks of about "
            f"{s['block_size']} consecutive layers per class folder; whole blocks held out, "
            f"{s['purge_gap']} neighbours on each side of a held-out block dropped from training; "
            f"seed {s['seed']}. Held-out No_Defect layers per fold: {n_normal}. "
            f"{dup_text(r.get('duplicates'))}",
            "",
            "| model | macro-F1, mean ± sd over folds | macro-F1 pooled [95% CI] "
            "| defect AUROC pooled [95% CI] | defect AUROC per fold | N (No_Defect) "
            "| minutes (wall, shared CPU) |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"CNNs: inspect3d's `train` per fold at {s['size']} px, {s['epochs']} epochs, every "
            f"{s['subsample']}th training layer, batch {s['batch_size']}, CPU; the best epoch by "
            "held-out macro-F1 is kept (as `inspect3d train` does), which flatters the CNN rows "
            "slightly. Baselines use every training layer. The EfficientNet-Lite0 row is "
            "`inspect3d train model=efficientnet_lite0 model.freeze=true` (frozen backbone, head "
            f"trained on cached features) on every {s.get('lite0_every', 2)}nd training layer, "
            "scored on every held-out layer. Pooled = each layer predicted once "
            "by the fold model that did not train on its block; 95% CIs from a bootstrap over "
            "blocks (1000 resamples). Defect AUROC = defect vs No_Defect on 1 - P(No_Defect); "
            "pooled over folds it mixes five models' scores.",
            "",
            "![PBLM macro-F1 and AUROC](img/quality_pblm.png)",
            "",
            "Command: `.venv/bin/python benchmarks/quality/pblm_cv.py` "
            f"({common.machine_line(r['machine'])}).",
        ]
    )


def _cells(res: dict) -> list[str]:
    pf, p = res["per_fold"], res["pooled"]
    return [
        common.fmt_mean_sd([f["macro_f1"] for f in pf]),
        common.fmt_ci(p["macro_f1"], p["ci95"]["macro_f1"]),
        common.fmt_ci(p["auroc"], p["ci95"]["auroc"]),
        common.fmt_mean_sd([f["auroc"] for f in pf]),
        f"{p['n']} ({p['n_normal']})",
        f"{res['wall_s'] / 60:.1f}",
    ]


def dup_text(d: dict | None) -> str:
    if not d:
        return ""
    groups = "; ".join(" = ".join(g) for g in d["identical_groups"]) or "none"
    return (
        f"Byte-identical files: {groups}. They fall into different blocks, so in some folds a "
        "held-out layer has its exact twin in training (per fold: "
        f"{d['held_out_with_twin_in_training']} layers), a leak the block split cannot see."
    )


def plot(r: dict) -> None:
    title = "PBLM blocked 5-fold, pooled: {}"
    panels = [
        (title.format(name), lambda p, k=key: p[k], lambda p, k=key: p["ci95"][k])
        for key, name in (("macro_f1", "macro-F1"), ("auroc", "defect AUROC"))
    ]
    common.pooled_panels(r, ORDER, panels, "pblm")


if __name__ == "__main__":
    main()
