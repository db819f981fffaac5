"""PBLM 5-fold blocked cross-validation of the default model, with and without per-image
brightness normalisation, beside a brightness-only baseline that measures the known shortcut.

Splits: contiguous blocks of layers per class folder (jobs are unknown in PBLM), a purge gap
around held-out blocks (configs/data/pblm.yaml). Every figure is reported with its N.

    python benchmarks/pblm_cv.py [--root DIR] [--epochs 6] [--out docs/quality.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

from inspect3d.config import CONFIG_DIR
from inspect3d.data.manifest import class_list, scan_folder
from inspect3d.data.preprocess import Preprocess
from inspect3d.data.splits import kfold_split
from inspect3d.metrics import macro_f1
from inspect3d.train.dataset import load_layers
from inspect3d.train.run import train

VARIANTS = {
    "per_image": ["data.norm=per_image", "data.jitter=0.3"],
    "fixed": ["data.norm=fixed", "data.jitter=0.0"],
}
DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "pblm"


def brightness_baseline(root: Path, folds: int) -> list[dict]:
    """Nearest class-mean of the global mean grey level: what brightness alone achieves."""
    cfg = _compose(root, [])
    items = scan_folder(root)
    classes = class_list(items, cfg.data.normal_class)
    y = np.array([classes.index(it.label) for it in items])
    grey = load_layers(items, Preprocess(height=128, width=128), progress=False)
    mean = grey.reshape(len(items), -1).mean(1)
    rows = []
    for fold in range(folds):
        split = kfold_split(items, fold, folds, cfg.data.block_size, cfg.data.purge_gap, cfg.seed)
        centroids = np.array(
            [mean[split.train][y[split.train] == k].mean() for k in range(len(classes))]
        )
        pred = np.abs(mean[split.val, None] - centroids[None]).argmin(1)
        rows.append(
            {
                "fold": fold,
                "n": len(split.val),
                "macro_f1": macro_f1(y[split.val], pred, len(classes)),
            }
        )
    return rows


def _compose(root: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", ["data=pblm", f"data.root={root}", *overrides])


def run_cv(root: Path, out_dir: Path, variant: str, args) -> list[dict]:
    rows = []
    for fold in range(args.folds):
        cfg = _compose(
            root,
            [
                f"data.fold={fold}",
                f"data.folds={args.folds}",
                f"trainer.epochs={args.epochs}",
                f"data.height={args.size}",
                f"data.width={args.size}",
                f"data.subsample={args.subsample}",
                "trainer.progress=false",
                "trainer.batch_size=8",
                *VARIANTS[variant],
            ],
        )
        t = time.time()
        metrics, _ = train(cfg, out_dir / variant / f"fold{fold}")
        rows.append(
            {
                "fold": fold,
                "n": metrics["n"],
                "macro_f1": metrics["macro_f1"],
                "accuracy": metrics["accuracy"],
                "auroc": metrics["auroc"],
                "minutes": (time.time() - t) / 60,
            }
        )
        print(variant, rows[-1], flush=True)
    return rows


def summary(name: str, rows: list[dict]) -> str:
    f1 = [r["macro_f1"] for r in rows]
    per_fold = ", ".join(f"{r['macro_f1']:.3f} (N={r['n']})" for r in rows)
    sd = statistics.stdev(f1) if len(f1) > 1 else 0.0
    return f"| {name} | {statistics.mean(f1):.3f} ± {sd:.3f} | {per_fold} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--root", type=Path, default=Path(os.environ.get("PBLM_ROOT", DEFAULT_ROOT)))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--subsample", type=int, default=4)
    ap.add_argument("--variants", default="per_image,fixed")
    ap.add_argument("--work", type=Path, default=Path("outputs/pblm_cv"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    results = {"brightness only (nearest class mean)": brightness_baseline(args.root, args.folds)}
    for variant in args.variants.split(","):
        results[f"smallcnn, norm={variant}"] = run_cv(args.root, args.work, variant, args)
    lines = [
        f"## PBLM {args.folds}-fold blocked split, default model (smallcnn)",
        "",
        f"{args.size} px input, {args.epochs} epochs, every {args.subsample}th training layer; "
        "val = every layer of the held-out blocks. Macro-F1 over the 5 classes.",
        "",
        "| model | macro-F1 mean ± sd over folds | per fold (N) |",
        "|---|---|---|",
        *[summary(name, rows) for name, rows in results.items()],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    (args.work / "results.json").parent.mkdir(parents=True, exist_ok=True)
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    if args.out:
        with args.out.open("a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
