"""Normal-only maps and verdicts on jobs never seen, with the shipped fit-normal defaults.

- synthetic printer synth-a (machine frame, parts of new shapes per job, thin streaks):
  fitted on the good layers of the training seed's jobs, tested on the jobs of another seed
  (new parts, new places); pixel AUROC at image resolution, AUPRO up to 30% FPR, the share of
  defect layers whose map maximum lies within 16 px of a defect, good layers over the
  threshold, defect layers over it — with N and Wilson intervals; and the same printer with
  plain powder on the plate (no parts), fitted and tested alike;
- eos_parts (an industrial L-PBF machine, 4 jobs, no defects): fitted on 20 good layers of one
  job or of two jobs, with and without part masks; the share of every other job's good layers
  over the threshold, per job with a Wilson interval.

Scoring runs the fitted torch model (the exported ONNX model matches it to 1e-4, checked on
export). ``python benchmarks/quality/normal_maps.py [--only synth|synth-plain|eos|eos-masks]
[--size 512]``

Results: docs/quality/normal_maps.json and the ``normal_maps`` section of docs/quality.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import common
import numpy as np
import torch

from inspect3d.config import compose
from inspect3d.data.manifest import Item
from inspect3d.data.parts import cells_from_masks
from inspect3d.data.preprocess import Preprocess
from inspect3d.data.synth import SynthConfig, generate
from inspect3d.metrics import wilson_interval
from inspect3d.models.checkpoint import load_checkpoint, model_from_checkpoint
from inspect3d.normal.fit import fit_normal
from inspect3d.train.evaluate import mask_metrics

NAME = "normal_maps"
PRINTER = "synth-a"
EOS = common.DATASETS / "eos_parts"
FIT_LAYERS = 20
FIT_JOBS = 28  # seed-5 jobs generated for fitting (both printers; 80% good): 10 good synth-a jobs
FIT_PER_JOB = 2


def fit(root: Path, run: Path, *extra: str) -> tuple[torch.nn.Module, Preprocess, dict, float]:
    """fit-normal with the shipped defaults on ``root`` (``ok/`` + optional ``_parts/``)."""
    shutil.rmtree(run, ignore_errors=True)
    overrides = ["data=folder", f"data.root={root}", "data.normal_class=ok", *extra]
    if (root / "_parts").is_dir():
        overrides.append("normal.use_parts=true")  # the cases given part masks use them
    start = time.perf_counter()
    fit_normal(compose("fit_normal", overrides), run)
    seconds = time.perf_counter() - start
    ckpt = load_checkpoint(run / "checkpoint.pt")
    net = model_from_checkpoint(ckpt).eval()
    return net, Preprocess.from_dict(ckpt["preprocess"]), ckpt["metrics"], seconds


def score(
    net, pre: Preprocess, paths: list[Path], parts: list[Path | None] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Layer scores in threshold units (>= 1: over the threshold) and maps (threshold units);
    ``parts``: the layers' part masks, for a model fitted with part masks."""
    scores, maps = [], []
    parts = parts if parts is not None and net.part_scorer is not None else None
    with torch.inference_mode():
        for i in range(0, len(paths), 4):
            x = torch.from_numpy(np.stack([pre.load(p) for p in paths[i : i + 4]]))
            cells = None if parts is None else cells_of(net, pre, parts[i : i + 4])
            s, dmap = net.distances(x, cells)
            scores += (s / net.threshold).tolist()
            maps.append((dmap[:, 0] / net.threshold).numpy())
    return np.array(scores), np.concatenate(maps)


def cells_of(net, pre: Preprocess, masks: list[Path | None]) -> torch.Tensor:
    return torch.from_numpy(cells_from_masks(masks, net.features.grid(*pre.size)))


def plain(result: dict) -> dict:
    """``result`` with paths and numpy numbers as JSON writes them (strings, floats)."""
    return json.loads(
        json.dumps(result, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    )


def rate(k: int, n: int) -> dict:
    return {"k": int(k), "n": int(n), "rate": k / n if n else None, "ci95": wilson_interval(k, n)}


def link_layers(dest: Path, layers: list[tuple[Path, str, Path | None]]) -> Path:
    """``dest/ok/<name>`` (+ ``dest/_parts/<name>``) links for (image, name, part mask)."""
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "ok").mkdir(parents=True)
    for image, name, parts in layers:
        os.symlink(image.resolve(), dest / "ok" / name)
        if parts is not None:
            (dest / "_parts").mkdir(exist_ok=True)
            os.symlink(parts.resolve(), dest / "_parts" / name)
    return dest


# --- synthetic printer ---------------------------------------------------------------------


def manifest_rows(root: Path) -> list[list[str]]:
    return [line.split(",") for line in (root / "manifest.csv").read_text().splitlines()[1:]]


def spread_over_jobs(rows: list[list[str]], n_layers: int, per_job: int) -> list[list[str]]:
    """``n_layers`` good layers, ``per_job`` evenly spaced ones from each good job (every layer
    ``ok``) in job order: the fitting set the README recommends (good layers of many jobs)."""
    jobs: dict[str, list[list[str]]] = {}
    for r in rows:
        jobs.setdefault(r[2], []).append(r)
    good = [layers for layers in jobs.values() if all(r[1] == "ok" for r in layers)]
    picked = []
    for layers in good:
        at = np.linspace(0, len(layers) - 1, per_job).round().astype(int)
        picked += [layers[i] for i in at]
    if len(picked) < n_layers:
        raise ValueError(f"{len(good)} good jobs give {len(picked)} layers, not {n_layers}")
    return picked[:n_layers]


def synthetic(
    size: int,
    work: Path,
    parts: bool,
    printed: bool = True,
    extra: tuple[str, ...] = (),
    test_seed: int = 6,
) -> dict:
    """``parts``: fit with the part masks; ``printed``: jobs with parts (else plain powder);
    ``extra``: fit-normal overrides beyond the defaults (for one-off comparisons).
    Fitted on 2 good layers of each of 10 good jobs (seed 5), tested on 12 jobs of
    ``test_seed`` (6 in the report)."""
    fit_src, test_src = work / "synth_fit", work / "synth_test"
    common_settings = {"layers_per_job": 8, "size": size, "overwrite": True, "parts": printed}
    fit_cfg = SynthConfig(seed=5, n_jobs=FIT_JOBS, defect_fraction=0.2, **common_settings)
    generate(fit_src, fit_cfg, progress=False)
    test_cfg = SynthConfig(seed=test_seed, n_jobs=12, defect_fraction=0.8, **common_settings)
    generate(test_src, test_cfg, progress=False)
    rows = [r for r in manifest_rows(fit_src) if r[4] == PRINTER]
    chosen = spread_over_jobs(rows, FIT_LAYERS, FIT_PER_JOB)
    layers = [(fit_src / r[0], Path(r[0]).name,
               fit_src / "_parts" / Path(r[0]).name if parts else None)
              for r in chosen]  # fmt: skip
    fit_root = link_layers(work / "synth_fit_ok", layers)
    net, pre, fitted, seconds = fit(fit_root, work / "run_s", *extra)
    tests = [r for r in manifest_rows(test_src) if r[4] == PRINTER]
    items = [Item(path=test_src / r[0], label=r[1], job=r[2]) for r in tests]
    test_parts = [test_src / "_parts" / it.path.name for it in items]
    scores, maps = score(net, pre, [it.path for it in items], test_parts)
    labels = np.array([it.label for it in items])
    loc = mask_metrics(items, maps, test_src / "_masks", 1.0)
    over = scores >= 1.0
    per_class = {c: rate(over[labels == c].sum(), (labels == c).sum()) for c in set(labels)}
    return plain({
        "size": size, "part_masks": parts, "printed_parts": printed, "fit_layers": len(layers),
        "fit_jobs": len({r[2] for r in chosen}),
        "fit_seconds": round(seconds, 1),
        "fit_peak_rss_mb": fitted.get("peak_rss_mb"), "roi": fitted.get("roi"),
        "pixel_auroc": loc["pixel_auroc"], "pixel_auroc_ci95": loc["pixel_auroc_ci95"],
        "aupro_30": loc["aupro_30"], "aupro_30_ci95": loc["aupro_30_ci95"],
        "interval_groups": loc["interval_groups"],
        "peak_on_defect": loc["peak_on_defect"], "cell_auroc": loc["cell_auroc"],
        "good_over_threshold": rate(over[labels == "ok"].sum(), (labels == "ok").sum()),
        "defect_over_threshold": rate(over[labels != "ok"].sum(), (labels != "ok").sum()),
        "per_class_over_threshold": per_class,
    })  # fmt: skip


# --- eos_parts ---------------------------------------------------------------------------


def eos_jobs() -> dict[str, list[Path]]:
    jobs: dict[str, list[Path]] = {}
    for p in sorted((EOS / "layers").glob("*.png")):
        jobs.setdefault(p.stem.split("_")[0], []).append(p)
    return jobs


def eos_name(p: Path) -> str:
    job, layer = p.stem.split("_")
    return f"{job}__{layer}.png"  # the folder layout's <job>__<layer> convention


def eos_case(fit_jobs: list[str], parts: bool, work: Path) -> dict:
    jobs = eos_jobs()
    per_job = FIT_LAYERS // len(fit_jobs)
    chosen = [p for j in fit_jobs for p in jobs[j][:per_job]]
    layers = [(p, eos_name(p), EOS / "part_masks" / p.name if parts else None) for p in chosen]
    tag = "+".join(j[-6:] for j in fit_jobs) + ("_parts" if parts else "")
    net, pre, fitted, seconds = fit(link_layers(work / f"eos_{tag}", layers), work / "run_e")
    result = {"fit_jobs": fit_jobs, "part_masks": parts, "fit_layers": len(chosen),
              "fit_seconds": round(seconds, 1), "fit_peak_rss_mb": fitted.get("peak_rss_mb"),
              "roi": fitted.get("roi"), "jobs": {}}  # fmt: skip
    for job, paths in jobs.items():
        held = paths[per_job:] if job in fit_jobs else paths
        masks = [EOS / "part_masks" / p.name for p in held] if parts else None
        scores, _ = score(net, pre, held, masks)
        result["jobs"][job] = {"seen": job in fit_jobs, **rate((scores >= 1).sum(), len(held)),
                               "median_score": float(np.median(scores))}  # fmt: skip
    new = [v for v in result["jobs"].values() if not v["seen"]]
    result["new_jobs"] = rate(sum(v["k"] for v in new), sum(v["n"] for v in new))
    return result


def eos(work: Path, old: list[dict], masks_only: bool, stamp: str) -> list[dict]:
    """The eos_parts cases (measured at ``stamp``); with ``masks_only`` only those with part
    masks are rerun and the others kept from ``old``."""
    if not EOS.is_dir():
        print(f"skipping eos_parts: {EOS} is absent")
        return []
    jobs = sorted(eos_jobs())
    cases = [([jobs[0]], True), ([jobs[0]], False), (jobs[:2], True), (jobs[:2], False),
             (jobs[2:], True)]  # fmt: skip
    kept = {(tuple(c["fit_jobs"]), c["part_masks"]): c for c in old}
    out = []
    for fit_jobs, parts in cases:
        key = (tuple(fit_jobs), parts)
        if masks_only and not parts and key in kept:
            out.append(kept[key])
        else:
            out.append({**eos_case(fit_jobs, parts, work), "measured": stamp})
    return out


# --- report --------------------------------------------------------------------------------


def fmt_rate(r: dict) -> str:
    lo, hi = r["ci95"] or (None, None)
    ci = f"95% CI {common.fmt(lo, 2)}–{common.fmt(hi, 2)}"
    return f"{r['k']}/{r['n']} ({common.fmt(r['rate'], 2)}, {ci})"


SETTINGS = (
    "Shipped fit-normal defaults (native resolution, ROI auto, stride 8, smoothing, whitened "
    "bank of 2048, mirrored and 4 rotated views, calibration folds of whole jobs, or of regions "
    "of the layers when fitted on one job), plus "
    "normal.use_parts=true in the cases given part masks (columns and rows marked so)."
)


def _with_ci(c: dict, key: str) -> str:
    ci = c.get(f"{key}_ci95")
    interval = f" [{common.fmt(ci[0])}, {common.fmt(ci[1])}]" if ci else ""
    return common.fmt(c[key]) + interval


def _peak(s: dict) -> str:
    p = s["peak_on_defect"]
    return fmt_rate({"k": p["hits"], "n": p["n"], "rate": p["rate"], "ci95": p["ci95"]})


def case_name(c: dict) -> str:
    if not c.get("printed_parts", True):
        return "plain powder (no parts)"
    return "with part masks" if c["part_masks"] else "defaults"


def synthetic_table(cases: list[dict]) -> list[str]:
    s = cases[0]
    head = " | ".join(case_name(c) for c in cases)
    rows = [
        ("pixel AUROC (image resolution)", lambda c: _with_ci(c, "pixel_auroc")),
        ("AUPRO (FPR ≤ 30%)", lambda c: _with_ci(c, "aupro_30")),
        ("map maximum within 16 px of a defect", _peak),
        ("good layers over the threshold", lambda c: fmt_rate(c["good_over_threshold"])),
        ("defect layers over the threshold", lambda c: fmt_rate(c["defect_over_threshold"])),
        ("fit seconds / peak MB", lambda c: f"{c['fit_seconds']} / {c['fit_peak_rss_mb']}"),
        ("measured", lambda c: c.get("measured", "?")),
    ]
    lines = [
        f"**Synthetic printer {PRINTER}**, {s['size']} px: fitted on {s['fit_layers']} good "
        f"layers of {s.get('fit_jobs', '?')} good seed-5 jobs ({FIT_PER_JOB} evenly spaced "
        "layers each), tested on 12 seed-6 jobs (other part shapes and places; the last column: "
        "the same printer and jobs with plain powder on the plate, no parts, fitted and tested "
        "alike). Intervals: 95% bootstrap over the test jobs.", "",
        f"| figure | {head} |", "|---" * (len(cases) + 1) + "|",
    ]  # fmt: skip
    lines += [f"| {name} | " + " | ".join(f(c) for c in cases) + " |" for name, f in rows]
    for c in cases:
        tag = case_name(c)
        per = ", ".join(
            f"{k} {fmt_rate(r)}" for k, r in sorted(c["per_class_over_threshold"].items())
        )
        lines += ["", f"Defect layers over the threshold per class ({tag}): {per}"]
    return lines + [""]


def report(results: dict) -> str:
    m = results["machine"]
    command = "`python benchmarks/quality/normal_maps.py`"
    lines = [
        f"Machine: {common.machine_line(m)} (the last run). Command: {command}. {SETTINGS} "
        "Partial runs (`--only`) keep the other cases; each says when it was measured.",
        "",
    ]
    cases = results.get("synthetic") or {}
    if cases:
        lines += synthetic_table(list(cases.values()))
    if results.get("eos"):
        lines += ["**eos_parts** (no defects: every layer over the threshold is a false alarm):",
                  "", "| fitted on | part masks | new jobs over threshold | per new job |",
                  "|---|---|---|---|"]  # fmt: skip
        for c in results["eos"]:
            per = "; ".join(f"…{j[-6:]} {fmt_rate(v)}" for j, v in c["jobs"].items()
                            if not v["seen"])  # fmt: skip
            fitted = " + ".join(f"…{j[-6:]}" for j in c["fit_jobs"])
            masks = "yes" if c["part_masks"] else "no"
            row = f"| {fitted} ({c['fit_layers']} layers) | {masks} | {fmt_rate(c['new_jobs'])} |"
            lines.append(f"{row} {per} |")
        stamps = sorted({c.get("measured", "?") for c in results["eos"]})
        lines += ["", f"eos_parts rows measured: {', '.join(stamps)}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["synth", "synth-plain", "eos", "eos-masks"])
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    work = common.WORK / NAME
    work.mkdir(parents=True, exist_ok=True)
    results = common.load_results(common.RESULTS, NAME) or {}
    results["machine"] = common.print_machine()
    stamp = results["machine"]["date"]
    cases = {"defaults": (False, True), "part_masks": (True, True), "plain_powder": (False, False)}
    if args.only in (None, "synth", "synth-plain"):
        chosen = ["plain_powder"] if args.only == "synth-plain" else list(cases)
        results["synthetic"] = {**results.get("synthetic", {}), **{
            name: {**synthetic(args.size, work, *cases[name]), "measured": stamp}
            for name in chosen}}  # fmt: skip
        print(results["synthetic"])
    if args.only in (None, "eos", "eos-masks"):
        results["eos"] = eos(work, results.get("eos", []), args.only == "eos-masks", stamp)
    common.save_results(common.RESULTS, NAME, results)
    common.update_section(NAME, report(results))
    print(report(results))


if __name__ == "__main__":
    main()
