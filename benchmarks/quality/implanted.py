"""Defects implanted into real good layers: normal-only maps on real powder at native size.

Neither real set here has pixel masks, so the pixel figures of real layers come from good
layers of real machines with defects drawn into them, each with its exact mask:

- ``streak_h`` / ``streak_v``: a recoater streak, 1-3 px wide, dark or bright by 2-4x the
  layer's pixel noise, over 40-100% of the plate's width (height), along a row (column);
- ``hole``: a dark pit, radius 3-8 px, 4-8x the noise deep, soft edged;
- ``incandescence``: a bright glowing spot, core radius 3-8 px, +60-120 grey levels, with a
  glow of twice that radius (the mask is the core);
- ``spatter``: 6-20 dots of radius 1-2 px, dark or bright by 4-8x the noise, within 40 px.

"Noise" is the robust deviation of the layer from its own Gaussian blur (sigma 2 px): the
real scratches of PBLM's scratch classes stand 3-6 grey levels off their surroundings, at a
noise of about 1. Defects are placed inside the plate the fitted model inspects (its
``normal.roi``), away from its edge.

Cases (fit-normal with the shipped defaults, native resolution, no part masks):

- eos_parts: fitted on the first 20 layers of job …074338; every layer of the 3 other jobs
  (new part shapes), each once per defect kind; once without and once with the part masks
  (``normal.use_parts=true``, each implanted copy scored with its layer's mask);
- PBLM No_Defect (one session, 1024 px): fitted on layers 0-14, tested on layers 17-22 (a
  purge gap of 2 layers, exact duplicates of fitted layers left out), each once per kind.

Figures: pixel AUROC at image resolution, AUPRO up to 30% FPR, map maximum within 16 px of the
defect (``inspect3d.train.evaluate.mask_metrics``), per kind and over all; the layers over the
threshold with and without the defect.
``python benchmarks/quality/implanted.py [--only eos|eos_parts|pblm] [--set OVERRIDE ...]``;
``--set`` fits with fit-normal overrides (a variant, e.g. ``normal.residual=true``), reported
next to the defaults.
Results: docs/quality/implanted.json and the ``implanted`` section of docs/quality.md.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

import common
import cv2
import numpy as np
from normal_maps import EOS, eos_jobs, eos_name, fit, link_layers, plain, rate, score

from inspect3d.data.manifest import Item
from inspect3d.normal.roi import roi_mask
from inspect3d.train.evaluate import mask_metrics

NAME = "implanted"
KINDS = ("streak_h", "streak_v", "hole", "incandescence", "spatter")
PBLM = common.DATASETS / "pblm" / "No_Defect"
EDGE = 24  # px kept between a defect and the edge of the inspected plate


def noise_sigma(img: np.ndarray) -> float:
    """Robust pixel noise: 1.4826 x the median |layer - its Gaussian blur (sigma 2 px)|."""
    f = img.astype(np.float32)
    return max(float(np.median(np.abs(f - cv2.GaussianBlur(f, (0, 0), 2))) * 1.4826), 0.5)


def plate_mask(roi: list | None, shape: tuple[int, int]) -> np.ndarray:
    """The model's ROI at image resolution, eroded by ``EDGE`` px (bool, H x W)."""
    inside = roi_mask(roi, *shape) > 0
    kernel = np.ones((2 * EDGE + 1, 2 * EDGE + 1), np.uint8)
    return cv2.erode(inside.astype(np.uint8), kernel, borderValue=0) > 0


def _spot(rng: np.random.Generator, plate: np.ndarray) -> tuple[int, int]:
    ys, xs = np.nonzero(plate)
    i = int(rng.integers(len(ys)))
    return int(xs[i]), int(ys[i])


def _streak(rng, plate, sigma, vertical: bool) -> tuple[np.ndarray, np.ndarray]:
    x, y = _spot(rng, plate)
    line = plate[:, x] if vertical else plate[y, :]
    idx = np.flatnonzero(line)
    span = int(len(idx) * rng.uniform(0.4, 1.0))
    start = idx[0] + int(rng.integers(0, len(idx) - span + 1))
    width = int(rng.integers(1, 4))
    mask = np.zeros(plate.shape, bool)
    lo = (x if vertical else y) - width // 2
    if vertical:
        mask[start : start + span, lo : lo + width] = True
    else:
        mask[lo : lo + width, start : start + span] = True
    mask &= plate
    amp = rng.choice([-1, 1]) * rng.uniform(2.0, 4.0) * sigma
    delta = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 0.5) * amp
    return delta, mask


def _disc(shape, center, radius) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (xx - center[0]) ** 2 + (yy - center[1]) ** 2 <= radius**2


def _blob(rng, plate, sigma, kind: str) -> tuple[np.ndarray, np.ndarray]:
    center, r = _spot(rng, plate), rng.uniform(3, 8)
    mask = _disc(plate.shape, center, r)
    if kind == "hole":
        amp = -rng.uniform(4, 8) * sigma
        delta = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 1.0) * amp
    else:  # incandescence: a saturated core in a glow of twice its radius
        glow = _disc(plate.shape, center, 2 * r).astype(np.float32)
        core = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 1.0)
        delta = rng.uniform(60, 120) * (core + 0.3 * cv2.GaussianBlur(glow, (0, 0), r))
    return delta, mask


def _spatter(rng, plate, sigma) -> tuple[np.ndarray, np.ndarray]:
    cx, cy = _spot(rng, plate)
    mask = np.zeros(plate.shape, bool)
    delta = np.zeros(plate.shape, np.float32)
    for _ in range(int(rng.integers(6, 21))):
        c = (cx + rng.uniform(-40, 40), cy + rng.uniform(-40, 40))
        dot = _disc(plate.shape, c, rng.uniform(1, 2)) & plate
        mask |= dot
        amp = rng.choice([-1, 1]) * rng.uniform(4, 8) * sigma
        delta += cv2.GaussianBlur(dot.astype(np.float32), (0, 0), 0.5) * amp
    return delta, mask


def implant(img: np.ndarray, kind: str, plate: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """``img`` (uint8, H x W) with one defect of ``kind`` inside ``plate``; (image, mask)."""
    sigma = noise_sigma(img)
    if kind in ("streak_h", "streak_v"):
        delta, mask = _streak(rng, plate, sigma, kind == "streak_v")
    elif kind in ("hole", "incandescence"):
        delta, mask = _blob(rng, plate, sigma, kind)
    elif kind == "spatter":
        delta, mask = _spatter(rng, plate, sigma)
    else:
        raise ValueError(f"defect kind {kind!r} is not one of {KINDS}")
    out = np.clip(np.rint(img.astype(np.float32) + delta), 0, 255).astype(np.uint8)
    return out, mask


def implanted_set(
    layers: list[tuple[Path, str]], roi: list | None, work: Path, seed: int
) -> list[Item]:
    """Every (layer, job) with each kind implanted once: ``work/<kind>/<name>.png`` and its
    mask ``work/_masks/<kind>/<name>.png``; items labelled with the kind (job: the layer's job)."""
    shutil.rmtree(work, ignore_errors=True)
    rng = np.random.default_rng(seed)
    items = []
    for path, job in layers:
        img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        plate = plate_mask(roi, img.shape)
        for kind in KINDS:
            out, mask = implant(img, kind, plate, rng)
            dest = work / kind / f"{Path(path).stem.replace(' ', '_')}.png"
            mask_path = work / "_masks" / kind / dest.name
            for p in (dest, mask_path):
                p.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(dest), out)
            cv2.imwrite(str(mask_path), mask.astype(np.uint8) * 255)
            items.append(Item(path=dest, label=kind, job=job))
    return items


def figures(
    net, pre, clean: list[Path], items: list[Item], masks: Path, parts: list | None = None
) -> dict:
    """Localisation per kind and over all, and the layers over the threshold; ``parts``: the
    clean layers' part masks (for a model fitted with them; each implanted copy has its
    layer's)."""
    clean_scores, _ = score(net, pre, clean, parts)
    copies = None if parts is None else [m for m in parts for _ in KINDS]
    scores, maps = score(net, pre, [it.path for it in items], copies)
    labels = np.array([it.label for it in items])
    out = {"all": _loc(items, maps, masks), "clean_over_threshold":
           rate((clean_scores >= 1).sum(), len(clean))}  # fmt: skip
    out["all"]["over_threshold"] = rate((scores >= 1).sum(), len(scores))
    for kind in KINDS:
        keep = np.flatnonzero(labels == kind)
        loc = _loc([items[i] for i in keep], maps[keep], masks)
        out[kind] = {**loc, "over_threshold": rate((scores[keep] >= 1).sum(), len(keep))}
    return out


def _loc(items: list[Item], maps: np.ndarray, masks: Path) -> dict:
    m = mask_metrics(items, maps, masks, 1.0)
    keys = ("pixel_auroc", "pixel_auroc_ci95", "aupro_30", "aupro_30_ci95", "peak_on_defect",
            "interval_groups")  # fmt: skip
    return {k: m[k] for k in keys}


def part_mask(layer: Path) -> Path:
    return EOS / "part_masks" / layer.name


def eos_case(work: Path, parts: bool = False, extra: tuple[str, ...] = ()) -> dict:
    """``parts``: fitted and scored with the part masks (``normal.use_parts=true``);
    ``extra``: fit-normal overrides."""
    jobs = eos_jobs()
    fit_job = sorted(jobs)[0]
    fitted = [(p, eos_name(p), part_mask(p) if parts else None) for p in jobs[fit_job][:20]]
    tag = "eos_parts" if parts else "eos"
    net, pre, meta, seconds = fit(
        link_layers(work / f"{tag}_fit", fitted), work / f"run_{tag}", *extra
    )
    tests = [(p, j) for j in sorted(jobs) if j != fit_job for p in jobs[j]]
    items = implanted_set(tests, meta.get("roi"), work / "eos_test", seed=11)
    clean = [p for p, _ in tests]
    masks = [part_mask(p) for p in clean] if parts else None
    result = figures(net, pre, clean, items, work / "eos_test" / "_masks", masks)
    test = f"{len(tests)} layers of the {len(jobs) - 1} other jobs (intervals over these jobs)"
    return plain({"fit": f"…{fit_job[-6:]} (20 layers)", "test": test,
                  "fit_seconds": round(seconds, 1),
                  "fit_peak_rss_mb": meta.get("peak_rss_mb"), "size": list(pre.size),
                  **result})  # fmt: skip


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pblm_case(work: Path, extra: tuple[str, ...] = ()) -> dict:
    layers = sorted(PBLM.glob("*.jpg"))
    fit_layers, test = layers[:15], layers[17:]
    seen = {_digest(p) for p in fit_layers}
    test = [p for p in test if _digest(p) not in seen]
    fitted = [(p, p.name.replace(" ", "_"), None) for p in fit_layers]
    net, pre, meta, seconds = fit(link_layers(work / "pblm_fit", fitted), work / "run_pblm", *extra)
    tests = [(p, p.stem.replace(" ", "_")) for p in test]  # intervals over layers
    items = implanted_set(tests, meta.get("roi"), work / "pblm_test", seed=12)
    result = figures(net, pre, test, items, work / "pblm_test" / "_masks")
    where = f"{len(test)} later layers of the same session (17-22; intervals over layers)"
    return plain({"fit": "No_Defect 0-14 (15 layers)", "test": where,
                  "fit_seconds": round(seconds, 1),
                  "fit_peak_rss_mb": meta.get("peak_rss_mb"), "size": list(pre.size),
                  **result})  # fmt: skip


def _row(name: str, c: dict) -> str:
    pk = c["peak_on_defect"]
    peak = f"{pk['hits']}/{pk['n']}" if pk else "–"
    over = c["over_threshold"]
    return (f"| {name} | {common.fmt_ci(c['pixel_auroc'], c['pixel_auroc_ci95'])} | "
            f"{common.fmt_ci(c['aupro_30'], c['aupro_30_ci95'])} | {peak} | "
            f"{over['k']}/{over['n']} |")  # fmt: skip


HEADER = (
    "| defect | pixel AUROC [95% CI] | AUPRO 30% [95% CI] | map maximum within 16 px "
    "| layers over the threshold |"
)


CASES = (("eos", "eos_parts"), ("eos_parts", "eos_parts, fitted and scored with part masks"),
         ("pblm", "PBLM No_Defect"))  # fmt: skip


def report(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"Machine: {common.machine_line(m)}. Command: `python benchmarks/quality/implanted.py`. "
        "Shipped fit-normal defaults; defects drawn into real good layers (the module's doc "
        "says how).",
        "",
    ]
    lines += _tables(results)
    for name, variant in sorted(results.get("variants", {}).items()):
        lines += [f"**Variant `{name}`** (`--set {name}`; the defaults otherwise):", ""]
        lines += _tables(variant)
    return "\n".join(lines)


def _tables(results: dict) -> list[str]:
    lines = []
    for key, title in CASES:
        c = results.get(key)
        if not c:
            continue
        clean = c["clean_over_threshold"]
        lines += [f"**{title}**: fitted on {c['fit']}, tested on {c['test']}, each layer once "
                  f"with every kind (input "
                  f"{c['size'][1]}x{c['size'][0]} px; fit {c['fit_seconds']} s, peak "
                  f"{common.fmt(c['fit_peak_rss_mb'], 0)} MB; the same layers without a defect: "
                  f"{clean['k']}/{clean['n']} over the threshold; measured {c['measured']}).",
                  "", HEADER, "|---|---|---|---|---|"]  # fmt: skip
        lines += [_row(k, c[k]) for k in KINDS] + [_row("all", c["all"]), ""]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["eos", "eos_parts", "pblm"])
    ap.add_argument("--set", nargs="+", default=[], metavar="OVERRIDE",
                    help="fit-normal overrides: measure a variant")  # fmt: skip
    args = ap.parse_args()
    extra = tuple(args.set)
    work = common.WORK / NAME / "_".join(extra).replace("=", "-")
    work.mkdir(parents=True, exist_ok=True)
    results = common.load_results(common.RESULTS, NAME) or {}
    results["machine"] = common.print_machine()
    stamp = results["machine"]["date"]
    into = results.setdefault("variants", {}).setdefault(" ".join(extra), {}) if extra else results
    cases = (("eos", lambda w: eos_case(w, False, extra), EOS),
             ("eos_parts", lambda w: eos_case(w, True, extra), EOS),
             ("pblm", lambda w: pblm_case(w, extra), PBLM))  # fmt: skip
    for key, case, src in cases:
        if args.only in (None, key) and src.is_dir():
            into[key] = {**case(work), "measured": stamp}
    common.save_results(common.RESULTS, NAME, results)
    common.update_section(NAME, report(results))
    print(report(results))


if __name__ == "__main__":
    main()
