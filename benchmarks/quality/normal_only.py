"""Normal-only models (fitted on <= 20 good layers, no defect examples): layer and pixel AUROC.

``inspect3d fit-normal`` (``inspect3d.normal.fit.fit_normal``) builds a model from good layers
alone (frozen ImageNet EfficientNet-Lite0 patch features and a nearest-neighbour / Gaussian
scorer). This benchmark fits it on a handful of good layers and scores held-out good and
defective layers with the model's raw anomaly distances:

- PBLM: the 23 No_Defect layers are cut into 3 contiguous blocks (inspect3d.data.splits, purge
  gap 2); per split the model is fitted on the other blocks' layers (minus the exact twins of
  held-out layers: 0000 = 0013, 0001 = 0014) and tested on the held-out block plus every
  ``--defect-every``-th layer of each defect class;
- synthetic: fitted on 20 good layers of printer synth-a (good jobs of the training seed),
  tested on other jobs (test seed) of the same printer and of printer synth-b (another camera
  set-up); pixel AUROC against the generator's masks on the model's patch grid.

    python benchmarks/quality/normal_only.py [--only pblm|synth] [--size 256]

Results: docs/quality/normal_only.json and the ``normal_only`` section of docs/quality.md.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections import defaultdict
from pathlib import Path

import common
import numpy as np
import torch

from inspect3d.data.layers import load_layers
from inspect3d.data.manifest import Item, scan_folder, write_manifest
from inspect3d.data.preprocess import Preprocess
from inspect3d.data.splits import kfold_split
from inspect3d.metrics import auroc, bootstrap_ci

NAME = "normal_only"
FITTED: dict = {}  # settings and calibration of the last model fitted (for the report)


# ----------------------------------------------------------------------------------------------
# fitting and scoring with inspect3d's normal-only model


def fit(items: list[Item], normal_class: str, out_dir: Path, size: int, channels: int = 1):
    """Fit a normal-only model on exactly ``items`` (good layers): (torch model, Preprocess)."""
    from inspect3d.models.checkpoint import load_checkpoint, model_from_checkpoint
    from inspect3d.normal.fit import fit_normal

    write_manifest(items, out_dir / "fit" / "manifest.csv")
    cfg = compose_fit(
        [
            "data=manifest",
            f"data.root={out_dir / 'fit'}",
            f"data.normal_class={normal_class}",
            f"data.height={size}",
            f"data.width={size}",
            f"data.channels={channels}",
            f"seed={common.SEED}",
        ]
    )
    _, path = fit_normal(cfg, out_dir)
    ckpt = load_checkpoint(path)
    FITTED.update(settings=ckpt["config"]["normal"], calibration=ckpt.get("calibration"))
    return model_from_checkpoint(ckpt).eval(), Preprocess.from_dict(ckpt["preprocess"])


def compose_fit(overrides: list[str]):
    from inspect3d.config import compose

    return compose("fit_normal", overrides)


@torch.inference_mode()
def distances(model, items: list[Item], pre: Preprocess, batch: int = 8):
    """Raw anomaly distance per layer (N,) and per patch (N, h, w)."""
    layer, patch = [], []
    for start in range(0, len(items), batch):
        x = torch.from_numpy(load_layers(items[start : start + batch], pre, progress=False))
        d, dmap = model.distances(x)
        layer.append(d.numpy())
        patch.append(dmap[:, 0].numpy())
    return np.concatenate(layer), np.concatenate(patch)


def mask_grid(items: list[Item], shape: tuple[int, int], size: int) -> np.ndarray:
    """Defect masks on the model's patch grid: a cell is defective if any pixel in it is."""
    masks = load_layers(items, Preprocess(height=size, width=size), progress=False)
    t = torch.from_numpy(masks > 0).float()
    return (torch.nn.functional.adaptive_max_pool2d(t, shape)[:, 0] > 0).numpy()


def layer_figures(is_defect: np.ndarray, scores: np.ndarray, groups: list[str]) -> dict:
    return {
        "auroc": auroc(is_defect, scores),
        "ci95": bootstrap_ci(auroc, is_defect, scores, groups),
        "n_normal": int((~is_defect).sum()),
        "n_defect": int(is_defect.sum()),
        "n_groups": len(set(groups)),
    }


# ----------------------------------------------------------------------------------------------
# PBLM


def pblm_splits(normals: list[Item], n_splits: int, purge_gap: int) -> list[tuple[list, list]]:
    """(fit, held-out) normal layers per split: contiguous blocks, purge gap, no exact twins."""
    digest = [hashlib.sha256(it.path.read_bytes()).hexdigest() for it in normals]
    out = []
    block = -(-len(normals) // n_splits)
    for s in range(n_splits):
        split = kfold_split(normals, s, n_splits, block, purge_gap, common.SEED)
        held = set(split.val)
        twins = {digest[i] for i in held}
        fit_idx = [i for i in split.train if digest[i] not in twins][:20]
        out.append((fit_idx, sorted(held)))
    return out


def run_pblm(args) -> dict:
    t0 = time.time()
    items = scan_folder(args.pblm_root)
    normals = [it for it in items if it.label == "No_Defect"]
    defects = defect_sample(items, "No_Defect", args.defect_every)
    rows, scores, labels, groups = [], [], [], []
    for s, (fit_idx, held_idx) in enumerate(pblm_splits(normals, args.pblm_splits, 2)):
        out = common.WORK / NAME / f"pblm-split{s}-{args.size}px"
        model, pre = fit([normals[i] for i in fit_idx], "No_Defect", out, args.size)
        test = [normals[i] for i in held_idx] + defects
        d, _ = distances(model, test, pre)
        y = np.array([it.label != "No_Defect" for it in test])
        rows.append(
            {
                "split": s,
                "n_fit": len(fit_idx),
                "fit_layers": [normals[i].path.name for i in fit_idx],
                "held_out": [normals[i].path.name for i in held_idx],
                "auroc": auroc(y, d),
                "n_normal": len(held_idx),
                "n_defect": len(defects),
            }
        )
        print("pblm", rows[-1], flush=True)
        scores.append(d)
        labels.append(y)
        # bootstrap groups: the held-out normal block, and blocks of 5 sampled defect layers
        # (every 20th layer of a class: 5 of them span about 100 consecutive layers)
        groups += [f"s{s}/normal"] * len(held_idx)
        groups += [f"s{s}/{it.label}/{k // 5}" for k, it in enumerate(defects)]
    pooled = layer_figures(np.concatenate(labels), np.concatenate(scores), groups)
    return {
        "splits": rows,
        "pooled": pooled,
        "n_defect_sampled": len(defects),
        "defect_every": args.defect_every,
        "size": args.size,
        "wall_s": round(time.time() - t0, 1),
    }


def defect_sample(items: list[Item], normal: str, every: int) -> list[Item]:
    """Every ``every``-th layer of each defect class folder (consecutive layers look alike)."""
    by_class: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        if it.label != normal:
            by_class[it.label].append(it)
    return [it for c in sorted(by_class) for it in by_class[c][::every]]


# ----------------------------------------------------------------------------------------------
# synthetic printers


def run_synth(args) -> dict:
    t0 = time.time()
    train = common.synth_set(
        common.TRAIN_SEED, args.synth_train_jobs, args.size, common.TRAIN_DEFECT_FRACTION
    )
    test = common.synth_set(
        common.TEST_SEED, args.synth_jobs, args.size, common.TEST_DEFECT_FRACTION
    )
    good_a = [it for it in train if it.printer == "synth-a" and job_is_good(train, it.job)]
    pick = np.linspace(0, len(good_a) - 1, min(args.n_fit, len(good_a))).round().astype(int)
    fit_items = [good_a[i] for i in pick]
    model, pre = fit(fit_items, "ok", common.WORK / NAME / f"synth-a-{args.size}px", args.size)
    out = {
        "fit": {
            "printer": "synth-a",
            "n_fit": len(fit_items),
            "jobs": sorted({it.job for it in fit_items}),
        },
        "threshold": float(model.threshold),
        "tests": {},
    }
    for printer in ("synth-a", "synth-b"):
        jobs = sorted({it.job for it in test if it.printer == printer})[: args.synth_test_jobs]
        items = [it for it in test if it.job in set(jobs)]
        d, dmap = distances(model, items, pre)
        y = np.array([it.label != "ok" for it in items])
        groups = [it.job for it in items]
        res = layer_figures(y, d, groups)
        res["pixel"] = pixel_figures(items, dmap, args.size)
        res["n_jobs"] = len(jobs)
        if printer == "synth-a":
            res["policies"] = {
                name: common.policy_figures(
                    common.replay_jobs(items, d, float(model.threshold), pol), 2
                )
                for name, pol in common.POLICIES.items()
            }
        out["tests"][printer] = res
        print("synth", printer, {k: v for k, v in res.items() if k != "policies"}, flush=True)
    out["calibration"] = FITTED.get("calibration")
    out["wall_s"] = round(time.time() - t0, 1)
    return out


def job_is_good(items: list[Item], job: str) -> bool:
    return all(it.label == "ok" for it in items if it.job == job)


def pixel_figures(items: list[Item], dmap: np.ndarray, size: int, n_boot: int = 200) -> dict:
    """Patch-level AUROC against the masks (cells of all test layers), bootstrap over jobs."""
    masks = mask_grid([replace_path_with_mask(it) for it in items], dmap.shape[1:], size)
    y = masks.reshape(len(items), -1)
    s = dmap.reshape(len(items), -1)
    groups = [it.job for it in items]
    flat_groups = np.repeat(np.array(groups), y.shape[1])
    return {
        "auroc": auroc(y.ravel(), s.ravel()),
        "ci95": bootstrap_ci(auroc, y.ravel(), s.ravel(), list(flat_groups), n_boot),
        "n_cells": int(y.size),
        "n_defect_cells": int(y.sum()),
        "grid": list(dmap.shape[1:]),
    }


def replace_path_with_mask(it: Item) -> Item:
    from dataclasses import replace

    if it.mask is None:
        raise ValueError(f"{it.path} has no mask: synthetic sets always write one")
    return replace(it, path=it.mask)


# ----------------------------------------------------------------------------------------------
# report


def goal_rows(r: dict) -> dict:
    """The figures the summary compares with the goal (layer AUROC from <= 20 good layers)."""
    rows = {}
    if "pblm" in r:
        p, sp = r["pblm"]["pooled"], r["pblm"]["splits"]
        rows[
            "PBLM, pooled over No_Defect splits (one session per class: shortcut not ruled out)"
        ] = {
            "auroc": p["auroc"],
            "ci95": p["ci95"],
            "n_text": f"fit on {min(x['n_fit'] for x in sp)}-{max(x['n_fit'] for x in sp)} layers; "
            f"test N={p['n_normal']} normal, {p['n_defect']} defect",
        }
    for printer, t in r.get("synth", {}).get("tests", {}).items():
        rows[f"synthetic, fit on {r['synth']['fit']['printer']}, test {printer}"] = {
            "auroc": t["auroc"],
            "ci95": t["ci95"],
            "n_text": f"fit on {r['synth']['fit']['n_fit']} layers; test N={t['n_normal']} "
            f"normal, {t['n_defect']} defect layers of {t['n_jobs']} jobs",
        }
    return rows


def section(r: dict) -> str:
    ns = r.get("normal_settings") or {}
    lines = [
        "## Normal-only models: fitted on <= 20 good layers",
        "",
        "`inspect3d fit-normal` (called as `inspect3d.normal.fit.fit_normal`) with its defaults: "
        "frozen ImageNet EfficientNet-Lite0 patch features, scorer "
        f"`{ns.get('method')}`, patch grid stride {ns.get('grid_stride')}, layer score "
        f"`{ns.get('layer_score')}` (mean of the {ns.get('topk')} largest patch distances), "
        "per-image normalised grey input. Scores below are the raw distances (monotone in the "
        "model's defect score).",
        "",
    ]
    if "pblm" in r:
        p = r["pblm"]
        per = ", ".join(
            f"{common.fmt(x['auroc'])} (fit {x['n_fit']}, held out {x['n_normal']})"
            for x in p["splits"]
        )
        lines += [
            f"**PBLM** ({p['size']} px): the 23 No_Defect layers in {len(p['splits'])} contiguous "
            "blocks; per split the model is fitted on the other blocks (purge gap 2, exact twins "
            "of held-out layers removed) and tested on the held-out block plus every "
            f"{p['defect_every']}th layer of each defect class ({p['n_defect_sampled']} layers). "
            f"Layer AUROC per split: {per}. Pooled over splits: "
            f"{common.fmt_ci(p['pooled']['auroc'], p['pooled']['ci95'])} (N = "
            f"{p['pooled']['n_normal']} normal, {p['pooled']['n_defect']} defect scores, the "
            "same defect layers scored by each split's model, distances of three models mixed; "
            "CI by bootstrap over the normal blocks and blocks of 5 sampled defect layers). "
            "Weak: only "
            "23 normal layers from one session, and every defect class is another session, so "
            "a high AUROC can still be session recognition (see the PBLM section).",
            "",
        ]
    if "synth" in r:
        sy = r["synth"]
        rows = []
        for printer, t in sy["tests"].items():
            px = t["pixel"]
            rows.append(
                f"| {printer} | {t['n_jobs']} | {t['n_normal']} / {t['n_defect']} "
                f"| {common.fmt_ci(t['auroc'], t['ci95'])} "
                f"| {common.fmt_ci(px['auroc'], px['ci95'])} ({px['n_defect_cells']} of "
                f"{px['n_cells']} cells defective, grid {px['grid'][0]}x{px['grid'][1]}) |"
            )
        lines += [
            f"**Synthetic printers**: fitted on {sy['fit']['n_fit']} good layers of printer "
            f"{sy['fit']['printer']} (jobs {', '.join(sy['fit']['jobs'])} of the training seed), "
            "tested on other jobs (test seed) of the same printer and of another printer "
            "(different lighting, plate position and camera angle).",
            "",
            "| test printer | jobs | layers normal / defect | layer AUROC [95% CI] "
            "| pixel AUROC [95% CI] |",
            "|---|---|---|---|---|",
            *rows,
            "",
            "![normal-only AUROC](img/quality_normal_only.png)",
            "",
            "Pixel AUROC: patch distances against the generator's masks on the model's patch "
            "grid (a cell is defective if any pixel is). CIs by bootstrap over jobs (200 "
            "resamples for pixels).",
            "",
        ]
        pol = sy["tests"].get("synth-a", {}).get("policies")
        cal = sy.get("calibration") or {}
        if pol:
            lines += [
                "Watcher policy on these scores (printer synth-a jobs, the model's own "
                f"threshold: distance {common.fmt(cal.get('distance_threshold'), 1)}, set by "
                f"fit-normal for {100 * cal.get('target_frr', 0):.0f}% false rejects of good "
                f"layers from {cal.get('n_calibration')} out-of-fold scores, i.e. above the "
                "highest of them):",
                "",
            ]
            lines += [
                "| policy | false rejects per 100 good jobs [95% CI] | caught within <= 2 "
                "layers [95% CI] | missed |",
                "|---|---|---|---|",
            ]
            for name, f in pol.items():
                ci = f["false_rejects_ci95_per_100"]
                caught = common.fmt_ci(
                    f["within_max_delay_fraction"], f["within_max_delay_ci95"], 2
                )
                lines.append(
                    f"| {name} | {f['false_rejects_per_100']:.1f} [{ci[0]:.1f}, {ci[1]:.1f}] "
                    f"({f['false_rejects']}/{f['n_good_jobs']}) "
                    f"| {caught} "
                    f"({f['within_max_delay']}/{f['n_defect_jobs']}) | {f['missed']} |"
                )
            lines.append("")
    lines += [
        "Command: `.venv/bin/python benchmarks/quality/normal_only.py` "
        f"({common.machine_line(r['machine'])}).",
    ]
    return "\n".join(lines)


def plot(r: dict) -> None:
    plt = common.pyplot()

    labels, values, cis = [], [], []
    if "pblm" in r:
        p = r["pblm"]["pooled"]
        labels.append("PBLM, layers (pooled over splits)")
        values.append(p["auroc"])
        cis.append(p["ci95"])
    for printer, t in r.get("synth", {}).get("tests", {}).items():
        labels += [f"synthetic {printer}, layers", f"synthetic {printer}, pixels"]
        values += [t["auroc"], t["pixel"]["auroc"]]
        cis += [t["ci95"], t["pixel"]["ci95"]]
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(labels) + 1.0))
    common.interval_plot(ax, labels, values, cis, "normal-only, fitted on <= 20 good layers: AUROC")
    ax.axvline(0.95, ls="--", color="C3", lw=1)
    common.savefig(fig, "normal_only")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pblm-root", type=Path, default=common.DATASETS / "pblm")
    ap.add_argument("--only", choices=["pblm", "synth"], default=None)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--pblm-splits", type=int, default=3)
    ap.add_argument("--defect-every", type=int, default=20)
    ap.add_argument("--n-fit", type=int, default=20, help="good layers to fit on (synthetic)")
    ap.add_argument("--synth-train-jobs", type=int, default=32)
    ap.add_argument("--synth-jobs", type=int, default=200)
    ap.add_argument("--synth-test-jobs", type=int, default=30, help="per printer")
    ap.add_argument("--report-only", action="store_true", help="rewrite the doc from the JSON")
    args = ap.parse_args()
    results = common.load_results(common.RESULTS, NAME)
    if args.report_only:
        plot(results)
        common.update_section(NAME, section(results))
        return
    m = common.print_machine()
    if args.only in (None, "pblm"):
        results["pblm"] = run_pblm(args)
        common.save_results(common.RESULTS, NAME, results)
    if args.only in (None, "synth"):
        results["synth"] = run_synth(args)
    results["machine"] = m
    results["normal_settings"] = FITTED.get("settings")
    results["rows"] = goal_rows(results)
    common.save_results(common.RESULTS, NAME, results)
    plot(results)
    text = section(results)
    common.update_section(NAME, text)
    print(text)


if __name__ == "__main__":
    main()
