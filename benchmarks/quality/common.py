"""Shared pieces of the quality benchmarks: machine, configs, pooled figures, JSON and docs.

Each benchmark in this folder is one command that writes ``docs/quality/<name>.json`` and
rewrites its own section of ``docs/quality.md`` (between ``<!-- quality:<name> -->`` markers),
so the benchmarks can be rerun one at a time.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import statistics
from pathlib import Path

import numpy as np

from inspect3d.io import write_json_atomic, write_text_atomic
from inspect3d.metrics import summarize, wilson_interval

REPO = Path(__file__).resolve().parents[2]
DATASETS = Path(os.environ.get("INSPECT3D_SHARED", REPO.parent / "shared" / "datasets"))
DOC = REPO / "docs" / "quality.md"
RESULTS = REPO / "docs" / "quality"
IMG = REPO / "docs" / "img"
WORK = REPO / "outputs" / "quality"
SEED = 0


def machine() -> dict:
    """What the figures were measured on (printed and stored with every result)."""
    import onnxruntime
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def threads() -> int:
    """CPU threads for torch and onnxruntime: ``BENCH_THREADS`` (on a shared machine 1 wastes
    least to oversubscription), else all cores."""
    return int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1))


def print_machine() -> dict:
    """Set the thread count, log to stdout (inspect3d's epoch lines too), print the machine."""
    import torch

    torch.set_num_threads(threads())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    m = machine()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in m.items()), flush=True)
    return m


def machine_line(m: dict) -> str:
    return (
        f"{m['cpus']}-core {m['processor']} CPU, torch {m['torch']}, "
        f"onnxruntime {m['onnxruntime']}, {m['date']}"
    )


def compose_train(overrides: list[str]):
    """The ``inspect3d train`` config with ``overrides``, as Hydra composes it."""
    from inspect3d.config import compose

    return compose("train", overrides)


def train_and_predict(cfg, out_dir: Path) -> tuple[np.ndarray, dict]:
    """``inspect3d train`` on one fold, then class probabilities of that fold's held-out items
    (in the split's order) from the saved best checkpoint, and the run's metrics."""
    import torch

    from inspect3d.data.layers import load_layers
    from inspect3d.data.preprocess import Preprocess
    from inspect3d.data.sources import load_data
    from inspect3d.models.checkpoint import load_checkpoint, model_from_checkpoint
    from inspect3d.train.dataset import LayerDataset
    from inspect3d.train.loop import predict
    from inspect3d.train.run import train

    metrics, path = train(cfg, out_dir)
    ckpt = load_checkpoint(path)
    data = load_data(cfg.data, cfg.seed)
    labels = data.labels()
    pre = Preprocess.from_dict(ckpt["preprocess"])
    images = load_layers([data.items[i] for i in data.val], pre, progress=False)
    dataset = LayerDataset(images, [labels[i] for i in data.val])
    loader = torch.utils.data.DataLoader(dataset, batch_size=16)
    probs, _, _ = predict(model_from_checkpoint(ckpt), loader, torch.device("cpu"))
    return probs, metrics


# ----------------------------------------------------------------------------------------------
# figures


def wilson(k: int, n: int) -> tuple[float, float] | None:
    """95% Wilson score interval of k/n, None when n is 0: the product's ``wilson_interval``."""
    return wilson_interval(k, n)


def mean_sd(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and sample sd of the defined values, and how many were defined."""
    v = [x for x in values if x is not None]
    if not v:
        return None, None, 0
    return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0), len(v)


def pooled(y: np.ndarray, probs: np.ndarray, classes: list[str], groups: list[str]) -> dict:
    """Figures over all held-out predictions of a CV (each item predicted once), with 95%
    intervals from a bootstrap over groups (layer blocks / jobs / photos)."""
    m = summarize(y, probs, classes, 0, groups=groups, n_boot=1000)
    keep = ("n", "n_normal", "n_defect", "n_groups", "accuracy", "macro_f1", "auroc", "ci95")
    return {k: m[k] for k in keep} | {"confusion_matrix": m["confusion_matrix"]}


def kfold_splits(items, cfg, folds: int) -> list:
    """The leak-free split of every fold, exactly as ``inspect3d train`` makes it for ``cfg``."""
    from inspect3d.data.splits import kfold_split

    d = cfg.data
    return [kfold_split(items, f, folds, d.block_size, d.purge_gap, cfg.seed) for f in range(folds)]


def nearest(train_x: np.ndarray, train_y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, ...]:
    """1-NN class and defect score d_normal / (d_normal + d_defect) (class 0 = normal)."""
    d = ((x[:, None, :] - train_x[None, :, :]) ** 2).sum(-1) ** 0.5
    pred = train_y[d.argmin(1)]
    normal = train_y == 0
    d_n = d[:, normal].min(1) if normal.any() else np.full(len(x), np.inf)
    d_d = d[:, ~normal].min(1)
    score = d_n / np.maximum(d_n + d_d, 1e-12)
    return pred, np.nan_to_num(score, nan=1.0)


def baseline_predictions(feats: np.ndarray, y: np.ndarray, split, k: int, centroid: bool):
    tx, ty = feats[split.train], y[split.train]
    if centroid:  # nearest class mean
        tx = np.stack([tx[ty == c].mean(0) for c in range(k)])
        ty = np.arange(k)
    pred, score = nearest(tx, ty, feats[split.val])
    return probs_from_scores(pred, score, k)


def probs_from_scores(pred: np.ndarray, defect_score: np.ndarray, k: int) -> np.ndarray:
    """Pseudo-probabilities for a baseline that gives a class and a defect score in [0, 1].

    ``p[:, 0] = 1 - score`` (so defect AUROC uses the score) and the predicted defect class gets
    ``score``; argmax equals ``pred`` when ``pred == 0`` exactly where ``score < 0.5``.
    """
    probs = np.zeros((len(pred), k))
    probs[:, 0] = 1 - defect_score
    probs[np.arange(len(pred)), np.where(pred == 0, 1 % k, pred)] += defect_score
    return probs


def fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def fmt_ci(x: float | None, ci: list | tuple | None, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if not ci:
        return fmt(x, digits)
    return f"{x:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def fmt_mean_sd(values: list[float | None], digits: int = 3) -> str:
    mean, sd, n = mean_sd(values)
    if mean is None:
        return "n/a"
    extra = "" if n == len(values) else f" ({n} of {len(values)} folds defined)"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}{extra}"


# ----------------------------------------------------------------------------------------------
# outputs


def load_results(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def save_results(name: str, results: dict) -> Path:
    return write_json_atomic(RESULTS / f"{name}.json", results)


def merge_results(name: str, results: dict, variants: list[str]) -> dict:
    """Save ``results``, keeping the other variants' results another run saved meanwhile."""
    merged = load_results(name).get("variants", {})
    merged.update({v: results["variants"][v] for v in variants})
    results = results | {"variants": merged}
    save_results(name, results)
    return results


def update_section(name: str, text: str, doc: Path = DOC) -> Path:
    """Replace this benchmark's section of ``doc`` (between its markers), or append it."""
    begin, end = f"<!-- quality:{name} begin -->", f"<!-- quality:{name} end -->"
    block = f"{begin}\n{text.strip()}\n{end}"
    old = doc.read_text() if doc.is_file() else "# Quality on real and synthetic layers\n"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    return write_text_atomic(doc, new)


def savefig(fig, name: str) -> Path:
    """Save a small PNG to docs/img/quality_<name>.png."""
    path = IMG / f"quality_{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    return path


def interval_plot(ax, labels: list[str], values: list, cis: list, title: str) -> None:
    """Points with 95% interval bars, one row per label (None values are skipped)."""
    for row, (v, ci) in enumerate(zip(values, cis, strict=True)):
        if v is None:
            continue
        lo, hi = ci if ci else (v, v)
        ax.errorbar(v, row, xerr=[[v - lo], [hi - v]], fmt="o", capsize=3, color="C0")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylim(len(labels) - 0.5, -0.5)  # first label on top (also with shared y axes)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
