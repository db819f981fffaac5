"""Deterministic synthetic powder-bed (L-PBF) print jobs: layer images, defect masks, a manifest.

A job is a series of consecutive recoater-camera photos of the build plate, one per layer: fresh
powder (grain, lighting gradient, vignetting, dark machine around the plate) through which the
parts' cross-sections show faintly and change slowly with height. A defective job develops one
defect type at an onset layer that then persists: recoater streaks, a short powder feed, a
super-elevated part edge, or spatter. Every layer gets its own random exposure, larger than any
effect a defect has on the image mean or spread, so global statistics do not give the label away.

Output of ``generate(out, cfg)``::

    out/manifest.csv                   path,label,job,layer,printer,mask
    out/<label>/<job>__<layer>.png     layer images, one folder per class
    out/_masks/<job>__<layer>.png      defect masks (0 background, 255 defect)

Only numpy and OpenCV are used (no torch): the generator runs on the scoring install too.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from numbers import Real
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from inspect3d.data.layout import layer_file_name
from inspect3d.data.manifest import Item, write_manifest
from inspect3d.errors import InspectError

CLASSES = ("ok", "streak", "short_feed", "super_elevation", "spatter")
NORMAL_CLASS = "ok"
DEFECTS = CLASSES[1:]
MASK_DIR = "_masks"
MANIFEST = "manifest.csv"

# Independent random streams of one seed: (seed, stream, ...). Jobs, printers and the
# job-to-defect assignment never share numbers, so changing one leaves the others alone.
_JOB_STREAM, _PRINTER_STREAM, _ASSIGN_STREAM = 0, 1, 2
_POWDER = 100.0  # grey level of fresh powder under average light, before exposure
_PIVOT = 90.0  # grey level that contrast jitter turns around
_N_VERTICES = 128  # vertices of a part outline (enough for straight rectangle edges)
_ANGLES = np.linspace(0.0, 2 * np.pi, _N_VERTICES, endpoint=False)
_PROFILES = ("prism", "cone", "sphere", "flare", "overhang")
_MAX_PRINTERS = 26
_FLEET_SEED = 0
_Gen = np.random.Generator


@dataclass(frozen=True)
class SynthConfig:
    """What to generate; the same config always gives byte-identical files."""

    seed: int = 0
    n_jobs: int = 16
    layers_per_job: int = 20
    size: int = 512  # layers are size x size, grey uint8
    defect_fraction: float = 0.7  # share of jobs that develop a defect
    printers: int = 2  # printer names "synth-a", "synth-b", ...
    overwrite: bool = False


# ----------------------------------------------------------------------------------------------
# public API


def generate(
    out: str | Path, cfg: SynthConfig = SynthConfig(), progress: bool = True
) -> list[Item]:
    """Write the data set to ``out``; return the items (one per layer).

    The set is built in a hidden temporary folder beside ``out`` and renamed into place at the
    end, so an interrupted run leaves no half-written ``out``.
    """
    _check_config(cfg)
    out = Path(out).expanduser()
    _check_out(out, cfg.overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        rel = _write_jobs(tmp, cfg, progress)
        write_manifest([_below(tmp, it) for it in rel], tmp / MANIFEST)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [_below(out, it) for it in rel]


def render_job(cfg: SynthConfig, job_index: int) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """(image uint8 HxW, mask uint8 HxW 0/255, label) per layer of one job; pure, deterministic."""
    _check_config(cfg)
    if not 0 <= job_index < cfg.n_jobs:
        raise InspectError(f"job_index={job_index!r} is not valid: use 0..{cfg.n_jobs - 1}")
    seeds = np.random.SeedSequence([cfg.seed, _JOB_STREAM, job_index]).spawn(cfg.layers_per_job + 1)
    job = _make_job(cfg, job_index, np.random.default_rng(seeds[0]))
    return [
        _render_layer(job, layer, np.random.default_rng(seeds[layer + 1]))
        for layer in range(cfg.layers_per_job)
    ]


def job_name(cfg: SynthConfig, job_index: int) -> str:
    """Name of job ``job_index``: job000, job001, ... (wider when there are more jobs)."""
    return f"job{job_index:0{max(3, len(str(cfg.n_jobs - 1)))}d}"


def printer_name(index: int) -> str:
    """Name of printer ``index``: synth-a, synth-b, ..."""
    return f"synth-{chr(ord('a') + index)}"


# ----------------------------------------------------------------------------------------------
# validation and output folder


def _check_config(cfg: SynthConfig) -> None:
    _check_int("seed", cfg.seed, 0)
    _check_int("n_jobs", cfg.n_jobs, 1)
    _check_int("layers_per_job", cfg.layers_per_job, 2)
    _check_int("size", cfg.size, 64)
    _check_int("printers", cfg.printers, 1, _MAX_PRINTERS)
    f = cfg.defect_fraction
    if isinstance(f, bool) or not isinstance(f, Real) or not 0.0 <= f <= 1.0:
        raise InspectError(
            f"defect_fraction={f!r} is not valid: use a number from 0 (no defects) to 1 (all jobs)"
        )


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if ok and value >= low and (high is None or value <= high):
        return
    valid = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
    raise InspectError(f"{name}={value!r} is not valid: use {valid}")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InspectError(f"output {str(out)!r} is a file, not a folder: pass another out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InspectError(
            f"output folder {str(out)!r} exists and is not empty: pass overwrite=true to "
            "replace it, or another out"
        )


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished set onto ``out``, replacing what was there (checked by _check_out)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, old / "set")
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _below(root: Path, item: Item) -> Item:
    mask = root / item.mask if item.mask else None
    return replace(item, path=root / item.path, mask=mask)


# ----------------------------------------------------------------------------------------------
# writing


def _write_jobs(root: Path, cfg: SynthConfig, progress: bool) -> list[Item]:
    """Render and write every job below ``root``; items with paths relative to ``root``."""
    items: list[Item] = []
    for j in tqdm(range(cfg.n_jobs), desc="synth jobs", unit="job", disable=not progress):
        job, printer = job_name(cfg, j), printer_name(j % cfg.printers)
        for layer, (image, mask, label) in enumerate(render_job(cfg, j)):
            name = layer_file_name(job, layer)
            _write_png(root / label / name, image)
            _write_png(root / MASK_DIR / name, mask)
            items.append(Item(Path(label, name), label, job, layer, printer, Path(MASK_DIR, name)))
    return items


def _write_png(path: Path, array: np.ndarray) -> None:
    # imencode + write_bytes instead of imwrite: works with any path and reports failures
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(buf.tobytes())


# ----------------------------------------------------------------------------------------------
# jobs: printer, plate, parts, defect plan


@dataclass(frozen=True)
class _Printer:
    gain: float  # brightness of its light
    light_dir: tuple[float, float]  # unit vector (x, y) towards the brighter side of the bed
    gradient: float  # relative brightness change across the bed
    vignette: float  # relative darkening at the corners
    corners: np.ndarray  # 4x2 plate corners (x, y) as fractions of the image (TL, TR, BR, BL)
    feed_down: bool  # recoater moves down the image: the far end of the bed is at the bottom


@dataclass(frozen=True)
class _Part:
    center: np.ndarray  # (x, y) px at the first layer
    radius: float  # px, largest outline radius at full scale
    rho: np.ndarray  # outline radius per angle of _ANGLES, max 1
    profile: str  # how the cross-section changes with height (one of _PROFILES)
    drift: np.ndarray  # (x, y) px the cross-section moves over the whole job (overhangs lean)


@dataclass(frozen=True, eq=False)
class _Job:
    size: int
    n_layers: int
    printer: _Printer
    light: np.ndarray  # float32 HxW: grey level of fresh powder
    plate: np.ndarray  # float32 HxW: 1 on the build plate, 0 outside, soft edge
    outside: np.ndarray  # float32 HxW: grey level of the machine around the plate
    mottle: np.ndarray  # float32 HxW: static low-frequency powder unevenness, unit spread
    box: tuple[int, int, int, int]  # x0, y0, x1, y1: rectangle inside the plate
    parts: tuple[_Part, ...]
    part_contrast: float  # relative brightness of powder over parts
    defect: str | None
    onset: int  # first defective layer (n_layers when the job stays ok)
    plan: dict = field(default_factory=dict)  # the defect's persistent parameters


def _rng(*key: int) -> _Gen:
    return np.random.default_rng(np.random.SeedSequence(list(key)))


def _job_defects(cfg: SynthConfig) -> list[str | None]:
    """Defect type per job: a seeded shuffle of jobs, defect types dealt round-robin."""
    rng = _rng(cfg.seed, _ASSIGN_STREAM)
    order = rng.permutation(cfg.n_jobs)
    n_defective = int(math.floor(cfg.defect_fraction * cfg.n_jobs + 0.5))
    first = int(rng.integers(len(DEFECTS)))
    defects: list[str | None] = [None] * cfg.n_jobs
    for k, j in enumerate(order[:n_defective]):
        defects[j] = DEFECTS[(first + k) % len(DEFECTS)]
    return defects


def _printer(index: int) -> _Printer:
    # A printer is the same machine whatever the seed: sets made with other seeds are new jobs
    # on the same fleet (a held-out set then tests new jobs, not an unseen camera set-up).
    rng = _rng(_FLEET_SEED, _PRINTER_STREAM, index)
    angle = rng.uniform(0, 2 * np.pi)
    left, right = rng.uniform(0.02, 0.06), rng.uniform(0.03, 0.09)
    top, bottom = rng.uniform(0.0, 0.03), rng.uniform(0.02, 0.06)
    slant_l, slant_r = rng.uniform(0.0, 0.03, size=2)  # perspective: the camera looks obliquely
    corners = np.array(
        [
            [left + slant_l, top],
            [1 - right - slant_r, top],
            [1 - right, 1 - bottom],
            [left, 1 - bottom],
        ]
    )
    return _Printer(
        gain=float(rng.uniform(0.9, 1.1)),
        light_dir=(math.cos(angle), math.sin(angle)),
        gradient=float(rng.uniform(0.3, 0.5)),
        vignette=float(rng.uniform(0.15, 0.3)),
        corners=corners,
        feed_down=bool(rng.random() < 0.5),
    )


def _make_job(cfg: SynthConfig, job_index: int, rng: _Gen) -> _Job:
    size, n_layers = cfg.size, cfg.layers_per_job
    printer = _printer(job_index % cfg.printers)
    plate = _fill(size, [printer.corners * size])
    plate = cv2.GaussianBlur(plate, (0, 0), 1.0)
    box = _inner_box(printer.corners, size)
    defect = _job_defects(cfg)[job_index]
    onset = int(rng.integers(1, max(1, int(0.7 * (n_layers - 1))) + 1)) if defect else n_layers
    job = _Job(
        size=size,
        n_layers=n_layers,
        printer=printer,
        light=_lighting(printer, size, rng),
        plate=plate,
        outside=_machine(size, rng),
        mottle=_smooth_noise(rng, (size, size), size // 8),
        box=box,
        parts=_make_parts(rng, size, box),
        part_contrast=float(rng.choice([-1, 1]) * rng.uniform(0.04, 0.08)),
        defect=defect,
        onset=onset,
    )
    if defect:
        job.plan.update(_PLANNERS[defect](job, rng))
    return job


def _inner_box(corners: np.ndarray, size: int) -> tuple[int, int, int, int]:
    """Largest axis-aligned rectangle inside the (trapezoid) plate, a few pixels in."""
    x0 = max(corners[0, 0], corners[3, 0]) * size + 3
    x1 = min(corners[1, 0], corners[2, 0]) * size - 3
    y0 = corners[0, 1] * size + 3
    y1 = corners[2, 1] * size - 3
    return int(x0), int(y0), int(x1), int(y1)


def _lighting(printer: _Printer, size: int, rng: _Gen) -> np.ndarray:
    u = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    xx, yy = u[None, :], u[:, None]
    lx, ly = printer.light_dir
    gradient = 1 + printer.gradient * (xx * lx + yy * ly) / math.sqrt(2)
    vignette = 1 - printer.vignette * (xx**2 + yy**2) / 2
    level = _POWDER * printer.gain * rng.uniform(0.97, 1.03)
    return (level * gradient * vignette).astype(np.float32)


def _machine(size: int, rng: _Gen) -> np.ndarray:
    """The dark machine around the plate: uneven, darker towards the image border."""
    u = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    edge = np.maximum(np.abs(u)[None, :], np.abs(u)[:, None])
    level = rng.uniform(15, 30) * (1.2 - 0.5 * edge)
    return (level + 2 * _smooth_noise(rng, (size, size), max(4, size // 10))).astype(np.float32)


def _make_parts(rng: _Gen, size: int, box: tuple[int, ...]) -> tuple[_Part, ...]:
    """A few parts, placed without overlap, far enough inside the plate for spatter around them."""
    parts: list[_Part] = []
    for _ in range(int(rng.integers(2, 6))):
        for _try in range(30):  # rejection sampling of a free spot; a few tries suffice
            part = _random_part(rng, size, box)
            if part is not None and all(_apart(part, p) for p in parts):
                parts.append(part)
                break
    if not parts:  # tiny plates: one part in the middle
        x0, y0, x1, y1 = box
        center = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
        parts.append(_Part(center, 0.08 * size, np.ones(_N_VERTICES), "prism", np.zeros(2)))
    return tuple(parts)


def _random_part(rng: _Gen, size: int, box: tuple[int, ...]) -> _Part | None:
    radius = float(rng.uniform(0.05, 0.12) * size)
    profile = str(rng.choice(_PROFILES))
    drift = rng.uniform(-0.4, 0.4, size=2) * radius if profile == "overhang" else np.zeros(2)
    margin = 1.7 * radius + 6 + np.abs(drift)
    x0, y0, x1, y1 = box
    if x1 - x0 <= 2 * margin[0] or y1 - y0 <= 2 * margin[1]:
        return None
    low, high = np.array([x0, y0]) + margin, np.array([x1, y1]) - margin
    center = rng.uniform(low, high)
    return _Part(center, radius, _random_outline(rng), profile, drift)


def _apart(a: _Part, b: _Part) -> bool:
    return float(np.linalg.norm(a.center - b.center)) > 1.3 * (a.radius + b.radius) + 4


def _random_outline(rng: _Gen) -> np.ndarray:
    """Outline radius per angle: ellipse, rotated rectangle or rounded polygon, max 1."""
    kind, phi = int(rng.integers(3)), rng.uniform(0, 2 * np.pi)
    t = _ANGLES - phi
    if kind == 0:  # ellipse
        a, b = 1.0, rng.uniform(0.6, 1.0)
        rho = 1 / np.sqrt((np.cos(t) / a) ** 2 + (np.sin(t) / b) ** 2)
    elif kind == 1:  # rectangle
        a, b = 1.0, rng.uniform(0.4, 1.0)
        rho = 1 / np.maximum(np.abs(np.cos(t)) / a, np.abs(np.sin(t)) / b)
    else:  # polygon with k corners, rounded by a circular moving average of the radius
        k = int(rng.integers(3, 7))
        rho = math.cos(math.pi / k) / np.cos(np.mod(t, 2 * np.pi / k) - math.pi / k)
        window = np.ones(9) / 9
        rho = np.convolve(np.concatenate([rho[-4:], rho, rho[:4]]), window, mode="valid")
    return rho / rho.max()


def _part_scale(profile: str, f: float) -> float:
    """Cross-section size at height ``f`` (0 first layer .. 1 last) relative to full size."""
    if profile == "cone":
        return 1.0 - 0.5 * f
    if profile == "sphere":
        return 0.5 + 0.5 * math.sin(math.pi * (0.15 + 0.7 * f))
    if profile == "flare":
        return 0.55 + 0.45 * f
    return 1.0  # prism, overhang (which moves instead)


def _outline(part: _Part, f: float) -> np.ndarray:
    """Part cross-section at height ``f`` as a polygon, N x 2 (x, y) px."""
    r = part.radius * _part_scale(part.profile, f) * part.rho
    center = part.center + part.drift * f
    return center + np.stack([r * np.cos(_ANGLES), r * np.sin(_ANGLES)], axis=1)


# ----------------------------------------------------------------------------------------------
# layers


def _render_layer(job: _Job, layer: int, rng: _Gen) -> tuple[np.ndarray, np.ndarray, str]:
    f = layer / (job.n_layers - 1)
    # gain, contrast, offset: drawn first and whatever the layer shows, so exposure is no cue
    exposure = rng.uniform([0.78, 0.8, -16.0], [1.22, 1.2, 16.0])
    parts = _fill(job.size, [_outline(p, f) for p in job.parts])
    seen = cv2.GaussianBlur(parts, (0, 0), 1.2)  # through a fresh powder layer: blurred, faint
    # powder over consolidated metal lies denser: slightly other brightness, finer grain
    image = job.light * (1 + job.part_contrast * seen) + _powder(job, rng) * (1 - 0.35 * seen)
    mask = np.zeros((job.size, job.size), np.uint8)
    label = job.defect if job.defect is not None and layer >= job.onset else NORMAL_CLASS
    if label != NORMAL_CLASS:
        _DRAWERS[label](job, image, mask, layer, parts, rng)
    image = job.plate * image + (1 - job.plate) * job.outside
    image += 1.5 * rng.standard_normal(image.shape, dtype=np.float32)  # camera noise
    mask[job.plate < 0.5] = 0
    return _expose(image, *exposure), mask, label


def _powder(job: _Job, rng: _Gen) -> np.ndarray:
    """Fresh powder texture in grey levels: grain, recoater drag marks, slow unevenness."""
    size = job.size
    grain = cv2.GaussianBlur(rng.standard_normal((size, size), dtype=np.float32), (0, 0), 0.7)
    # the recoater drags grains along its path: faint short streaks in the recoating direction
    drag = cv2.blur(rng.standard_normal((size, size), dtype=np.float32), (1, 7))
    mottle = 0.85 * job.mottle + 0.15 * _smooth_noise(rng, (size, size), size // 8)
    return 10.0 * grain + 2.5 * drag + 2.0 * mottle


def _expose(image: np.ndarray, gain: float, contrast: float, offset: float) -> np.ndarray:
    """Camera exposure of this layer: random gain, contrast and offset, then 8 bits."""
    image = ((image - _PIVOT) * contrast + _PIVOT) * gain + offset
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _fill(size: int, polygons: list[np.ndarray]) -> np.ndarray:
    """Anti-aliased filled polygons (x, y px) as float32 coverage 0..1."""
    canvas = np.zeros((size, size), np.uint8)
    pts = [np.rint(np.asarray(p) * 16).astype(np.int32) for p in polygons]
    cv2.fillPoly(canvas, pts, 255, lineType=cv2.LINE_AA, shift=4)  # shift=4: 1/16 px vertices
    return canvas.astype(np.float32) / 255


def _smooth_noise(rng: _Gen, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Random field of spread about 1 that varies over about ``cell`` pixels."""
    h, w = shape
    cell = max(1, cell)
    small = rng.standard_normal((h // cell + 3, w // cell + 3)).astype(np.float32)
    big = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return big / (float(big.std()) + 1e-6)


# ----------------------------------------------------------------------------------------------
# defects: a planner (job-level, persistent) and a drawer (per layer) for each type
# Amplitudes are in grey levels before exposure; the exposure jitter is far larger.


def _plan_streak(job: _Job, rng: _Gen) -> dict:
    """1 to 4 recoater streaks; the first at onset, the others join later (they multiply)."""
    x0, y0, x1, y1 = job.box
    n = int(rng.integers(1, 5))
    xs: list[int] = []
    while len(xs) < n:  # keep streaks >= 5 px apart so each stays a separate thin line
        x = int(rng.integers(x0 + 2, x1 - 4))
        if all(abs(x - other) >= 5 for other in xs):
            xs.append(x)
    starts = np.sort(rng.integers(job.onset, job.n_layers, size=n))
    starts[0] = job.onset
    height = y1 - y0
    streaks = []
    for x, start in zip(xs, starts, strict=True):
        length = int(rng.uniform(0.55, 1.0) * height)  # from the pick-up point to the far end
        ya, yb = (y1 - length, y1) if job.printer.feed_down else (y0, y0 + length)
        width = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
        amp = float(rng.choice([-1, 1]) * rng.uniform(8, 14))  # dark or bright: no mean shift
        streaks.append((x, width, ya, yb, amp, int(start)))
    return {"streaks": streaks}


def _draw_streak(
    job: _Job, image: np.ndarray, mask: np.ndarray, layer: int, parts: np.ndarray, rng: _Gen
) -> None:
    for x, width, ya, yb, amp, start in job.plan["streaks"]:
        if layer < start:
            continue
        profile = amp * (0.8 + 0.2 * _smooth_noise(rng, (yb - ya, 1), 16))  # uneven along y
        image[ya:yb, x : x + width] += profile
        mask[ya:yb, x : x + width] = 255


def _plan_short_feed(job: _Job, rng: _Gen) -> dict:
    """Where too little powder arrives: a stretch of the bed's far end, its depth per column."""
    x0, y0, x1, y1 = job.box
    width = int(rng.uniform(0.35, 0.8) * (x1 - x0))
    xa = int(rng.integers(x0, x1 - width + 1))
    bump = np.sin(np.linspace(0, np.pi, width)) ** 0.7
    wobble = 1 + 0.15 * _smooth_noise(rng, (1, width), max(4, width // 3))[0]
    depth = np.zeros(job.size, np.float32)
    depth[xa : xa + width] = rng.uniform(0.15, 0.3) * (y1 - y0) * bump * wobble
    return {"depth": np.maximum(depth, 0), "dark": float(rng.uniform(0.75, 0.87))}


def _draw_short_feed(
    job: _Job, image: np.ndarray, mask: np.ndarray, layer: int, parts: np.ndarray, rng: _Gen
) -> None:
    plan, size = job.plan, job.size
    grow = min(1.0, 0.6 + 0.15 * (layer - job.onset)) * rng.uniform(0.9, 1.1)
    jag = 3 * _smooth_noise(rng, (1, size), 6)[0] + 1.5 * rng.standard_normal(size)
    depth = np.where(plan["depth"] > 0, np.maximum(plan["depth"] * grow + jag, 0), 0)
    _, y0, _, y1 = job.box
    rows = np.arange(size, dtype=np.float32)[:, None]
    into = (rows - (y1 + 3)) if job.printer.feed_down else ((y0 - 3) - rows)
    region = np.clip((into + depth[None, :]) / 2 + 0.5, 0, 1) * (depth > 0)[None, :]  # 2 px edge
    region = region.astype(np.float32)
    # thin powder: darker and rough (dashes along the recoating direction), parts show clearly
    rough = cv2.blur(rng.standard_normal((size, size), dtype=np.float32), (1, 5))
    outline = np.abs(parts - cv2.GaussianBlur(parts, (0, 0), 1.5))
    image *= 1 - (1 - plan["dark"]) * region
    image += region * (9 * rough + job.light * 0.1 * parts + 40 * outline)
    mask[region > 0.5] = 255


def _plan_super_elevation(job: _Job, rng: _Gen) -> dict:
    """A spot on the edge of the largest part that starts sticking out of the powder."""
    part = int(np.argmax([p.radius for p in job.parts]))
    scale = max(job.size / 512, 0.35)
    return {
        "part": part,
        "vertex": int(rng.integers(_N_VERTICES)),
        "length": float(rng.uniform(5, 9) * scale),
        "growth": float(rng.uniform(1.0, 2.5) * scale),
        "bright": float(rng.uniform(60, 100)),
        "shadow": float(rng.uniform(30, 50)),
    }


def _draw_super_elevation(
    job: _Job, image: np.ndarray, mask: np.ndarray, layer: int, parts: np.ndarray, rng: _Gen
) -> None:
    """A raised stretch of the part's edge: bright (specular) along the contour, shadow beside."""
    plan, t = job.plan, layer - job.onset
    part = job.parts[plan["part"]]
    outline = _outline(part, layer / (job.n_layers - 1))
    step = float(np.linalg.norm(outline[1] - outline[0])) + 1e-6
    half = round((plan["length"] + plan["growth"] * t) / 2 / step)
    half = min(max(1, half), _N_VERTICES // 4)  # long jobs: at most half the outline lifts
    edge = outline[(plan["vertex"] + np.arange(-half, half + 1)) % _N_VERTICES]
    thick = min(2 + t // 3, 5)
    normal = edge.mean(axis=0) - (part.center + part.drift * layer / (job.n_layers - 1))
    edge = edge + normal / (np.linalg.norm(normal) + 1e-6) * 0.4 * thick  # lifted just outside
    # the raised edge casts its shadow away from the light
    shadow = edge - np.array(job.printer.light_dir) * (thick + 2.0)
    dark = _stroke(job.size, shadow, thick, mask)
    bright = _stroke(job.size, edge, thick, mask)
    gain = rng.uniform(0.85, 1.15)
    image += plan["bright"] * gain * bright - plan["shadow"] * dark * (1 - bright)


def _stroke(size: int, points: np.ndarray, thick: int, mask: np.ndarray) -> np.ndarray:
    """Draw an open polyline into ``mask`` (255) and return it anti-aliased as float coverage."""
    canvas = np.zeros((size, size), np.uint8)
    pts = np.rint(points * 16).astype(np.int32)
    cv2.polylines(canvas, [pts], False, 255, int(thick), cv2.LINE_AA, shift=4)
    mask[canvas > 64] = 255
    return cv2.GaussianBlur(canvas.astype(np.float32) / 255, (0, 0), 0.6)


def _plan_spatter(job: _Job, rng: _Gen) -> dict:
    return {"rate": float(rng.uniform(4, 14) * job.size / 512)}  # fewer on small layers


def _draw_spatter(
    job: _Job, image: np.ndarray, mask: np.ndarray, layer: int, parts: np.ndarray, rng: _Gen
) -> None:
    """Spatter particles (2 to 6 px) near the parts; fresh ones every layer."""
    count = 1 + int(rng.poisson(job.plan["rate"] * rng.uniform(0.5, 1.5)))
    f = layer / (job.n_layers - 1)
    bright, dark = np.zeros((job.size, job.size), np.uint8), np.zeros_like(mask)
    for _ in range(count):
        part = job.parts[int(rng.integers(len(job.parts)))]
        angle = rng.uniform(0, 2 * np.pi)
        dist = part.radius * _part_scale(part.profile, f) * rng.uniform(0.5, 1.6) + 3
        xy = part.center + part.drift * f + dist * np.array([math.cos(angle), math.sin(angle)])
        xy = np.clip(xy, 3, job.size - 4)
        radius = rng.uniform(1.0, 3.0)  # diameter 2 to 6 px
        is_bright = rng.random() < 0.6  # mostly glinting metal, some dark oxide
        canvas, amp = (bright, rng.uniform(40, 90)) if is_bright else (dark, rng.uniform(25, 45))
        c, r = tuple(int(round(v * 16)) for v in xy), int(round(radius * 16))
        cv2.circle(canvas, c, r, int(amp), -1, cv2.LINE_AA, shift=4)
        cv2.circle(mask, c, r + 8, 255, -1, cv2.LINE_8, shift=4)  # +0.5 px: whole blob
    image += bright.astype(np.float32) - dark.astype(np.float32)


_Drawer = Callable[[_Job, np.ndarray, np.ndarray, int, np.ndarray, _Gen], None]
_PLANNERS: dict[str, Callable[[_Job, _Gen], dict]] = {
    "streak": _plan_streak,
    "short_feed": _plan_short_feed,
    "super_elevation": _plan_super_elevation,
    "spatter": _plan_spatter,
}
_DRAWERS: dict[str, _Drawer] = {
    "streak": _draw_streak,
    "short_feed": _draw_short_feed,
    "super_elevation": _draw_super_elevation,
    "spatter": _draw_spatter,
}
