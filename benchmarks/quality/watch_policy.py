"""Synthetic jobs through the watcher's decision policy: detection delay and false rejects.

1. Training jobs (synthetic seed 1) -> ``inspect3d train`` (default model) -> ``export`` (ONNX,
   with the threshold calibrated on the training run's normal validation layers).
2. Test jobs (seed 2, other jobs on the same synthetic printer fleet): every layer scored with
   onnxruntime (``OnnxModel.predict_batch``), as the watcher does.
3. Each job's scores replayed in layer order through ``inspect3d.watch.policy.replay`` (pure,
   the same code the watcher runs): layers from defect onset to REJECT on defective jobs, false
   rejects on good jobs. Policy settings from configs/watch.yaml; a few others beside them.

    python benchmarks/quality/watch_policy.py [--jobs 200] [--size 256] [--quick]

Results: docs/quality/watch_policy.json and the ``watch_policy`` section of docs/quality.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import common
import numpy as np
from common import (
    CALIB_SEED,
    POLICIES,
    TEST_DEFECT_FRACTION,
    TEST_SEED,
    TRAIN_DEFECT_FRACTION,
    TRAIN_SEED,
    job_critical_value,
    jobs_of,
    policy_figures,
    replay_jobs,
    synth_dir,
    synth_set,
)

from inspect3d.data.manifest import Item
from inspect3d.metrics import auroc, calibrate_threshold
from inspect3d.watch.policy import PolicyConfig

NAME = "watch_policy"
TARGET_JOB_FRR = 0.01
SWEPT = ("k=3 of n=5 (default)", "k=2 of n=5")


def train_model(train_root: Path, run: Path, size: int, epochs: int) -> Path:
    """Train the default model on the training jobs and export it; the ONNX path."""
    from inspect3d.config import compose
    from inspect3d.export.onnx import export_run
    from inspect3d.train.run import train

    if not (run / "model.onnx").is_file():
        cfg = common.compose_train(
            [
                "data=manifest",
                f"data.root={train_root}",
                "data.normal_class=ok",
                f"data.height={size}",
                f"data.width={size}",
                f"trainer.epochs={epochs}",
                "experiment=bench_cpu",  # configs/experiment/bench_cpu.yaml
                f"seed={common.SEED}",
            ]
        )
        t = time.time()
        train(cfg, run)
        (run / "train_minutes.txt").write_text(f"{(time.time() - t) / 60:.2f}\n")
        export_run(compose("export", [f"run={run}"]))
    return run / "model.onnx"


def score_layers(model_path: Path, items: list[Item], batch: int = 32) -> tuple[np.ndarray, float]:
    """Defect score of every layer with onnxruntime, and the model's threshold (cached beside
    the model, per data set)."""
    from inspect3d.infer import OnnxModel

    model = OnnxModel.load(model_path, provider="cpu", threads=common.threads())
    cache = model_path.parent / f"scores-{items[0].path.parents[1].name}.npy"
    if cache.is_file() and cache.stat().st_mtime > model_path.stat().st_mtime:
        return np.load(cache), float(model.threshold)
    t = time.time()
    scores = []
    for start in range(0, len(items), batch):
        chunk = [it.path for it in items[start : start + batch]]
        scores += [s.defect_score for s in model.predict_batch(chunk)]
    np.save(cache, np.array(scores))
    cache.with_suffix(".ms_per_layer.txt").write_text(
        f"{1000 * (time.time() - t) / len(items):.2f}\n"
    )
    return np.array(scores), float(model.threshold)


def calibrate_job_threshold(items, scores, policy: PolicyConfig, target: float) -> float:
    """Layer threshold at which ``policy`` rejects at most ``target`` of these (good) jobs."""
    critical = [
        job_critical_value([float(scores[i]) for i in idx], policy)
        for idx in jobs_of(items).values()
    ]
    return calibrate_threshold(np.array(critical), target)


def layer_auroc(items: list[Item], scores: np.ndarray) -> dict:
    labels = np.array([it.label != "ok" for it in items])
    groups = [it.job for it in items]
    from inspect3d.metrics import bootstrap_ci

    stat = lambda t, s: auroc(t, s)  # noqa: E731
    return {
        "auroc": auroc(labels, scores),
        "ci95": bootstrap_ci(stat, labels, scores, groups),
        "n_normal": int((~labels).sum()),
        "n_defect": int(labels.sum()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--jobs", type=int, default=200, help="test jobs (half of them good)")
    ap.add_argument("--train-jobs", type=int, default=32)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--max-delay", type=int, default=2)
    ap.add_argument(
        "--calib-jobs", type=int, default=100, help="good jobs for job-level calibration"
    )
    ap.add_argument("--quick", action="store_true", help="40 test jobs, 16 training jobs, 4 epochs")
    args = ap.parse_args()
    if args.quick:
        args.jobs, args.train_jobs, args.epochs, args.calib_jobs = 40, 16, 4, 20
    m = common.print_machine()
    t0 = time.time()
    train_root = synth_dir(TRAIN_SEED, args.train_jobs, args.size)
    synth_set(TRAIN_SEED, args.train_jobs, args.size, TRAIN_DEFECT_FRACTION)
    run = common.WORK / NAME / f"run-{args.size}px-{args.train_jobs}jobs-e{args.epochs}"
    model_path = train_model(train_root, run, args.size, args.epochs)
    t_train = 60 * float((model_path.parent / "train_minutes.txt").read_text())
    test_root = synth_dir(TEST_SEED, args.jobs, args.size)
    test = synth_set(TEST_SEED, args.jobs, args.size, TEST_DEFECT_FRACTION)
    scores, threshold = score_layers(model_path, test)
    ms_file = model_path.parent / f"scores-{test_root.name}.ms_per_layer.txt"
    ms_per_layer = float(ms_file.read_text()) if ms_file.is_file() else None
    results = {
        "machine": m,
        "settings": vars(args)
        | {"train_seed": TRAIN_SEED, "test_seed": TEST_SEED, "calib_seed": CALIB_SEED},
        "threshold": threshold,
        "layer": layer_auroc(test, scores),
        "policies": {},
        "minutes": {"train": t_train / 60},
        "ms_per_layer_scoring": ms_per_layer,
    }
    for name, policy in POLICIES.items():
        rows = replay_jobs(test, scores, threshold, policy)
        results["policies"][name] = policy_figures(rows, args.max_delay)
        if name.endswith("(default)"):
            results["jobs"] = rows
    calib = synth_set(CALIB_SEED, args.calib_jobs, args.size, 0.0)
    calib_scores, _ = score_layers(model_path, calib)
    results["calibrated"] = {}
    for name, policy in POLICIES.items():
        t_job = calibrate_job_threshold(calib, calib_scores, policy, TARGET_JOB_FRR)
        rows = replay_jobs(test, scores, t_job, policy)
        figures = policy_figures(rows, args.max_delay)
        results["calibrated"][name] = {"threshold": t_job, **figures}
    results["sweeps"] = {
        name: threshold_sweep(test, scores, POLICIES[name], args) for name in SWEPT
    }
    results["minutes"]["total"] = (time.time() - t0) / 60
    common.save_results(common.RESULTS, NAME, results)
    plot(test, scores, results)
    text = section(results)
    common.update_section(NAME, text)
    print(text)


def threshold_sweep(items, scores, policy: PolicyConfig, args) -> list[dict]:
    """The default policy's operating curve on the test jobs: false rejects and share caught in
    time per layer threshold (read off the test jobs: a curve, not a tuned setting)."""
    out = []
    for t in np.round(np.linspace(0.20, 0.40, 41), 3):
        f = policy_figures(replay_jobs(items, scores, float(t), policy), args.max_delay)
        out.append(
            {
                "threshold": float(t),
                "false_rejects_per_100": f["false_rejects_per_100"],
                "within_max_delay_fraction": f["within_max_delay_fraction"],
            }
        )
    return out


def sweep_text(sweeps: dict, max_delay: int) -> str:
    parts = []
    for name, sweep in sweeps.items():
        ok = [
            p["threshold"]
            for p in sweep
            if p["false_rejects_per_100"] <= 1 and p["within_max_delay_fraction"] >= 0.95
        ]
        best = max(
            (p for p in sweep if p["false_rejects_per_100"] <= 1),
            key=lambda p: p["within_max_delay_fraction"],
            default=None,
        )
        span = f"{min(ok):.3f}-{max(ok):.3f}" if ok else "none"
        best_txt = (
            f"; best share caught in time with <= 1 false reject: "
            f"{best['within_max_delay_fraction']:.2f} at {best['threshold']:.3f}"
            if best
            else ""
        )
        parts.append(f"{name}: {span}{best_txt}")
    return (
        "Operating curves over the layer threshold (right panel): thresholds at which the test "
        "jobs meet both goals (<= 1 false reject per 100 good jobs and >= 95% caught within "
        f"<= {max_delay} layers): " + "; ".join(parts) + ". Read off the test jobs, so these "
        "show how far the scores separate, not a validated setting."
    )


def median_delay(delays: list) -> float | None:
    v = np.percentile([np.inf if x is None else x for x in delays], 50, method="inverted_cdf")
    return None if np.isinf(v) else float(v)


def delay_text(x: float | None) -> str:
    return "missed" if x is None else f"{x:.0f}"


def policy_rows(policies: dict, with_threshold: bool = False) -> list[str]:
    rows = []
    for name, p in policies.items():
        ci = p["false_rejects_ci95_per_100"]
        t = f" (threshold {p['threshold']:.4f})" if with_threshold else ""
        rows.append(
            f"| {name}{t} | {p['false_rejects_per_100']:.1f} [{ci[0]:.1f}, {ci[1]:.1f}] "
            f"({p['false_rejects']}/{p['n_good_jobs']}) "
            f"| {delay_text(p['delay_median'])} | {delay_text(p['delay_p90'])} "
            f"| {common.fmt_ci(p['within_max_delay_fraction'], p['within_max_delay_ci95'], 2)} "
            f"({p['within_max_delay']}/{p['n_defect_jobs']}) "
            f"| {p['missed']} | {p['rejected_before_onset']} |"
        )
    return rows


def section(r: dict) -> str:
    s = r["settings"]
    header = [
        "| policy | false rejects per 100 good jobs [95% CI] "
        "| layers onset -> REJECT, median | p90 "
        f"| caught within <= {s['max_delay']} layers [95% CI] | missed "
        "| rejected before onset |",
        "|---|---|---|---|---|---|---|",
    ]
    calibrated = []
    if r.get("calibrated"):
        calibrated = [
            "",
            f"The same, with the layer threshold calibrated per policy on {s['calib_jobs']} "
            f"further good jobs (seed {s['calib_seed']}, not in the test) so that at most "
            f"{100 * TARGET_JOB_FRR:.0f}% of them would be rejected (job-level calibration; "
            "the watcher takes it as `policy.threshold=`):",
            "",
            *header,
            *policy_rows(r["calibrated"], with_threshold=True),
        ]
    lay = r["layer"]
    d = r["policies"]["k=3 of n=5 (default)"]["delay_by_defect"]
    by_defect = "; ".join(
        f"{k}: median {delay_text(median_delay(v))} "
        f"(N={len(v)}, missed {sum(x is None for x in v)})"
        for k, v in sorted(d.items())
    )
    return "\n".join(
        [
            "## Synthetic jobs through the watcher policy",
            "",
            "Model: default smallcnn trained with `inspect3d train` on "
            f"{s['train_jobs']} synthetic jobs (seed {s['train_seed']}, {s['size']} px, "
            f"{s['epochs']} epochs), exported to "
            f"ONNX; threshold {r['threshold']:.4f} (calibrated by training for 5% false rejects "
            "of normal validation layers). Test: "
            f"{s['jobs']} other jobs (seed {s['test_seed']}, 20 layers each, half of them with a "
            "defect from an onset layer on), each layer scored with onnxruntime, then replayed "
            "in order through `inspect3d.watch.policy.replay`. Layer AUROC on the test jobs: "
            f"{common.fmt_ci(lay['auroc'], lay['ci95'])} (N = {lay['n_normal']} normal, "
            f"{lay['n_defect']} defect layers; CI by bootstrap over jobs).",
            "",
            "Model threshold (5% of normal layers):",
            "",
            *header,
            *policy_rows(r["policies"]),
            *calibrated,
            "",
            sweep_text(r["sweeps"], s["max_delay"]) if r.get("sweeps") else "",
            "",
            "Layers from onset to REJECT count from the first defective layer (0 = the REJECT "
            "fired on the onset layer itself); with k=3 of n=5 the earliest possible is 2. "
            "Missed jobs count as never caught in the median and p90. CIs: Wilson intervals "
            f"over jobs. By defect type (default policy): {by_defect}.",
            "The printers are the same synthetic fleet in training and test (new jobs, not a new "
            "camera); the policies other than the default were not tuned on anything, they show "
            "the trade-off on the same test jobs.",
            "",
            "![synthetic watcher](img/quality_watch.png)",
            "",
            f"Command: `.venv/bin/python benchmarks/quality/watch_policy.py` "
            f"({common.machine_line(r['machine'])}; training {r['minutes']['train']:.1f} min, "
            f"this run {r['minutes']['total']:.1f} min, scoring "
            f"{common.fmt(r['ms_per_layer_scoring'], 1)} ms per layer, wall, on the shared CPU).",
        ]
    )


def plot(items: list[Item], scores: np.ndarray, r: dict) -> None:
    plt = common.pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(13, 3))
    jobs = jobs_of(items)
    for idx in list(jobs.values())[:60]:
        onset = next((items[i].layer for i in idx if items[i].label != "ok"), None)
        layers = np.array([items[i].layer for i in idx], dtype=float)
        x = layers - onset if onset is not None else layers - 10
        axes[0].plot(x, scores[idx], color="C3" if onset is not None else "C0", alpha=0.3, lw=0.8)
    axes[0].axhline(r["threshold"], ls="--", color="k", lw=1)
    axes[0].set_xlabel("layer - onset (good jobs: layer - 10)")
    axes[0].set_ylabel("defect score")
    axes[0].set_title("60 test jobs: red defective, blue good", fontsize=9)
    p = r["policies"]["k=3 of n=5 (default)"]
    delays = [x for v in p["delay_by_defect"].values() for x in v if x is not None]
    if delays:
        axes[1].hist(delays, bins=np.arange(-0.5, max(delays) + 1.5), color="C1")
    axes[1].set_xlabel("layers from onset to REJECT (default policy)")
    axes[1].set_ylabel("jobs")
    axes[1].set_title(
        f"caught {p['caught']}, missed {p['missed']} of {p['n_defect_jobs']}", fontsize=9
    )
    for k, (name, sweep) in enumerate(r.get("sweeps", {}).items()):
        t = [p["threshold"] for p in sweep]
        short = name.replace(" (default)", "")
        axes[2].plot(
            t, [p["false_rejects_per_100"] for p in sweep], f"C{k}-", label=f"{short}: FR/100"
        )
        axes[2].plot(
            t,
            [100 * p["within_max_delay_fraction"] for p in sweep],
            f"C{k}:",
            label=f"{short}: % caught <= 2",
        )
    axes[2].axhline(1, ls="--", color="grey", lw=0.8)
    axes[2].axhline(95, ls="--", color="grey", lw=0.8)
    axes[2].set_xlabel("layer threshold")
    axes[2].set_ylabel("per 100 jobs")
    axes[2].legend(fontsize=7)
    axes[2].set_title("operating curves on the test jobs", fontsize=9)
    fig.tight_layout()
    common.savefig(fig, "watch")
    plt.close(fig)


if __name__ == "__main__":
    main()
