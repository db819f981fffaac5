"""Shared pieces of the quality benchmarks: configs, CV runs, pooled figures, policy replay, plots.

Each benchmark in this folder is one command that writes ``docs/quality/<name>.json`` and
rewrites its own section of ``docs/quality.md`` (between ``<!-- quality:<name> begin -->`` and
``<!-- quality:<name> end -->``), so the benchmarks can be rerun one at a time. The machine,
the results file, the section writer and pyplot are ``benchmarks/support.py``'s.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inspect3d.data.manifest import Item, read_manifest
from inspect3d.metrics import summarize, wilson_interval
from inspect3d.watch.policy import LayerObs, PolicyConfig, replay

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for support.py
# the scripts use these as common's: one definition each, in support.py
from support import load_results, machine, machine_line, pyplot, save_results, write_section  # noqa: E402, F401

REPO = Path(__file__).resolve().parents[2]
DATASETS = Path(os.environ.get("INSPECT3D_SHARED", REPO.parent / "shared" / "datasets"))
DOC = REPO / "docs" / "quality.md"
RESULTS = REPO / "docs" / "quality"
IMG = REPO / "docs" / "img"
WORK = REPO / "outputs" / "quality"
SEED = 0


def threads() -> int:
    """CPU threads for torch and onnxruntime: ``BENCH_THREADS`` (on a shared machine 1 wastes
    least to oversubscription), else all cores."""
    return int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1))


def print_machine() -> dict:
    """Set the thread count, log to stdout (inspect3d's epoch lines too), print the machine."""
    import torch

    torch.set_num_threads(threads())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    m = machine() | {"torch_threads": torch.get_num_threads()}
    print("machine: " + ", ".join(f"{k}={v}" for k, v in m.items()), flush=True)
    return m


def compose_train(overrides: list[str]):
    """The ``inspect3d train`` config with ``overrides``, as Hydra composes it."""
    from inspect3d.config import compose

    return compose("train", overrides)


def train_and_predict(cfg, out_dir: Path) -> tuple[np.ndarray, dict]:
    """``inspect3d train`` on one fold, then class probabilities of that fold's held-out items
    (in the split's order) from the saved best checkpoint, and the run's metrics."""
    from inspect3d.data.sources import load_data
    from inspect3d.train.run import train

    metrics, path = train(cfg, out_dir)
    data = load_data(cfg.data, cfg.seed)
    return predict_items(path, [data.items[i] for i in data.val]), metrics


def predict_items(checkpoint: Path, items: list[Item]) -> np.ndarray:
    """Class probabilities of ``items`` (in order) from a saved checkpoint, on the CPU."""
    import torch

    from inspect3d.data.layers import load_layers
    from inspect3d.data.preprocess import Preprocess
    from inspect3d.models.checkpoint import load_checkpoint, model_from_checkpoint
    from inspect3d.train.dataset import LayerDataset
    from inspect3d.train.loop import predict

    ckpt = load_checkpoint(checkpoint)
    pre = Preprocess.from_dict(ckpt["preprocess"])
    images = load_layers(items, pre, progress=False)
    loader = torch.utils.data.DataLoader(LayerDataset(images, [0] * len(items)), batch_size=16)
    probs, _, _ = predict(model_from_checkpoint(ckpt), loader, torch.device("cpu"))
    return probs


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


@dataclass(frozen=True)
class CVSet:
    """What a cross-validation runs on: labels (class indices, 0 = normal), class names, and
    the leak-free split of every fold."""

    y: np.ndarray
    classes: list[str]
    splits: list


def cross_validate(
    cv: CVSet, variant: str, predict: Callable[[int, Any], tuple[np.ndarray, dict]]
) -> tuple[np.ndarray, list[dict]]:
    """``predict(fold, split)`` -> (probabilities of ``split.val``, more figures of the fold)
    on every fold: the held-out probabilities (each item predicted by the one fold that holds
    it out) and a row per fold (n, accuracy, macro-F1, AUROC, seconds and the extra figures)."""
    probs = np.zeros((len(cv.y), len(cv.classes)))
    per_fold = []
    for fold, split in enumerate(cv.splits):
        t = time.time()
        p, extra = predict(fold, split)
        probs[split.val] = p
        m = summarize(cv.y[split.val], p, cv.classes, 0, n_boot=0)
        keep = {k: m[k] for k in ("n", "accuracy", "macro_f1", "auroc")}
        per_fold.append({"fold": fold, **keep, "seconds": round(time.time() - t, 1), **extra})
        print(variant, per_fold[-1], flush=True)
    return probs, per_fold


def pooled_cv(cv: CVSet, probs: np.ndarray) -> dict:
    """``pooled`` figures over every held-out item of a CV, bootstrapped over its groups."""
    held = sorted(i for split in cv.splits for i in split.val)
    groups = [cv.splits[0].groups[i] for i in held]
    return pooled(cv.y[held], probs[held], cv.classes, groups)


def variant_result(label: str, per_fold: list[dict], pooled_figures: dict, t0: float) -> dict:
    """A CV variant's entry in the results file; ``t0``: when its work began."""
    wall = round(time.time() - t0, 1)
    return {"label": label, "per_fold": per_fold, "pooled": pooled_figures, "wall_s": wall}


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


def variant_rows(
    r: dict, order: tuple, labels: dict, columns: int, cells: Callable[[dict], list[str]]
) -> list[str]:
    """A markdown table row per variant in ``order``: its label, then ``cells(result)``; a
    variant without results gets "not run" and empty cells up to ``columns``."""
    rows = []
    for v in order:
        res = r["variants"].get(v)
        if res is None:
            rows.append(f"| {labels[v]} | not run |" + " |" * (columns - 2))
        else:
            rows.append("| " + " | ".join([res["label"], *cells(res)]) + " |")
    return rows


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
# synthetic printer fleets and the watcher's decision policy (watch_policy.py, normal_only.py)

TRAIN_SEED, TEST_SEED, CALIB_SEED = 1, 2, 3
TRAIN_DEFECT_FRACTION, TEST_DEFECT_FRACTION = 0.7, 0.5
POLICIES = {  # name -> PolicyConfig; the first is the watcher's default
    "k=3 of n=5 (default)": PolicyConfig(),
    "k=2 of n=3": PolicyConfig(k=2, n=3, warn_k=1),
    "k=2 of n=5": PolicyConfig(k=2, n=5, warn_k=1),
    "k=4 of n=5": PolicyConfig(k=4, n=5, warn_k=1),
}


def synth_dir(seed: int, n_jobs: int, size: int) -> Path:
    """Where a synthetic set lives (watch_policy.py and normal_only.py share it: generated once)."""
    return WORK / "synth" / f"seed{seed}-{n_jobs}jobs-{size}px"


def synth_set(seed: int, n_jobs: int, size: int, defect_fraction: float) -> list[Item]:
    """A synthetic set in ``synth_dir``, generated once (deterministic from its settings) and
    reused."""
    from inspect3d.data.synth import SynthConfig, generate

    out = synth_dir(seed, n_jobs, size)
    if not (out / "manifest.csv").is_file():
        cfg = SynthConfig(
            seed=seed, n_jobs=n_jobs, size=size, defect_fraction=defect_fraction, overwrite=True
        )
        generate(out, cfg, progress=False)
    return read_manifest(out / "manifest.csv")


def jobs_of(items: list[Item]) -> dict[str, list[int]]:
    jobs: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        jobs[it.job].append(i)
    return {j: sorted(idx, key=lambda i: items[i].layer) for j, idx in jobs.items()}


def replay_jobs(items, scores, threshold: float, policy: PolicyConfig) -> list[dict]:
    """Per job: onset (first defect layer or None), first WARN and REJECT layer (or None)."""
    rows = []
    for job, idx in jobs_of(items).items():
        obs = [LayerObs(items[i].layer, float(scores[i]), items[i].label) for i in idx]
        _, decisions = replay(obs, policy, threshold)
        first = {d.level: d.at_layer for d in reversed(decisions)}
        onset = next((items[i].layer for i in idx if items[i].label != "ok"), None)
        rows.append(
            {
                "job": job,
                "defect": next((items[i].label for i in idx if items[i].label != "ok"), None),
                "layers": len(idx),
                "onset": onset,
                "warn_at": first.get("WARN"),
                "reject_at": first.get("REJECT"),
            }
        )
    return rows


def job_critical_value(scores: list[float], policy: PolicyConfig) -> float:
    """Lowest layer threshold at which ``policy``'s k-of-n rule would REJECT this job (the
    largest k-th highest score over its windows); -inf if it has too few layers."""
    counted = scores[policy.ignore_first :]
    worst = -np.inf
    for end in range(policy.k, len(counted) + 1):
        window = counted[max(0, end - policy.n) : end]
        if len(window) >= policy.k:
            worst = max(worst, sorted(window)[-policy.k])
    return float(worst)


def policy_figures(rows: list[dict], max_delay: int) -> dict:
    """Delay from onset to REJECT (layers; 0 = at the onset layer) and false rejects."""
    good = [r for r in rows if r["onset"] is None]
    bad = [r for r in rows if r["onset"] is not None]
    false_rejects = sum(r["reject_at"] is not None for r in good)
    early = sum(r["reject_at"] is not None and r["reject_at"] < r["onset"] for r in bad)
    delays = [
        r["reject_at"] - r["onset"]
        for r in bad
        if r["reject_at"] is not None and r["reject_at"] >= r["onset"]
    ]
    within = sum(d <= max_delay for d in delays)
    # missed jobs count as never caught: the delay percentiles take them as +inf
    all_delays = np.array(delays + [np.inf] * (len(bad) - len(delays) - early), dtype=float)

    def pct(q: float) -> float | None:  # no interpolation; None: a missed job (never caught)
        if not len(all_delays):
            return None
        v = float(np.percentile(all_delays, q, method="inverted_cdf"))
        return None if np.isinf(v) else v

    return {
        "n_good_jobs": len(good),
        "n_defect_jobs": len(bad),
        "false_rejects": false_rejects,
        "false_rejects_per_100": 100 * false_rejects / max(1, len(good)),
        "false_rejects_ci95_per_100": [100 * x for x in wilson(false_rejects, len(good))],
        "rejected_before_onset": early,
        "caught": len(delays),
        "missed": len(bad) - len(delays) - early,
        "delay_median": pct(50),
        "delay_p90": pct(90),
        "within_max_delay": within,
        "within_max_delay_fraction": within / max(1, len(bad)),
        "within_max_delay_ci95": wilson(within, len(bad)),
        "delay_by_defect": delay_by_defect(bad),
    }


def delay_by_defect(bad: list[dict]) -> dict:
    out: dict[str, list] = defaultdict(list)
    for r in bad:
        caught = r["reject_at"] is not None and r["reject_at"] >= r["onset"]
        out[r["defect"]].append(r["reject_at"] - r["onset"] if caught else None)
    return dict(out)


# ----------------------------------------------------------------------------------------------
# outputs


def merge_results(name: str, results: dict, variants: list[str]) -> dict:
    """Save ``results``, keeping the other variants' results another run saved meanwhile."""
    merged = load_results(RESULTS, name).get("variants", {})
    merged.update({v: results["variants"][v] for v in variants})
    results = results | {"variants": merged}
    save_results(RESULTS, name, results)
    return results


def update_section(name: str, text: str, doc: Path = DOC) -> Path:
    """Replace this benchmark's section of ``doc`` (between its markers), or append it."""
    begin, end = f"<!-- quality:{name} begin -->", f"<!-- quality:{name} end -->"
    return write_section(doc, begin, end, text, "# Quality on real and synthetic layers")


def savefig(fig, name: str) -> Path:
    """Save a small PNG to docs/img/quality_<name>.png."""
    path = IMG / f"quality_{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    return path


def pooled_panels(r: dict, order: tuple, panels: list[tuple], name: str) -> None:
    """docs/img/quality_<name>.png: a panel per (title, value, interval) of the variants in
    ``order`` (``value(pooled)``, ``interval(pooled)`` of each), the 0.95 goal in the first."""
    plt = pyplot()
    shown = [v for v in order if v in r["variants"]]
    labels = [r["variants"][v]["label"] for v in shown]
    pooled_figures = [r["variants"][v]["pooled"] for v in shown]
    fig, axes = plt.subplots(1, len(panels), figsize=(9, 0.45 * len(shown) + 1.2), sharey=True)
    for ax, (title, value, interval) in zip(axes, panels, strict=True):
        values = [value(p) for p in pooled_figures]
        interval_plot(ax, labels, values, [interval(p) for p in pooled_figures], title)
    axes[0].axvline(0.95, ls="--", color="C3", lw=1)
    savefig(fig, name)
    plt.close(fig)


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
