"""Deterministic synthetic powder-bed (L-PBF) print jobs: layer images, masks, a manifest.

A job is a series of consecutive camera photos of the build plate, one per layer, taken after the
laser has fused the layer: fresh powder (grain, lighting gradient, vignetting) with the parts'
fused cross-sections in it (smoother than powder, their own brightness, faint laser hatch lines, a
bright melted contour), changing slowly with height. Around the plate the camera sees the
machine's frame (brushed metal, recoater rails, bolt holes, a reflection), fixed per printer: each
printer has its own frame width, plate offset and frame brightness. A defective job develops one
defect type at an onset layer that then persists: recoater streaks (1 to 3 px wide, along or
across the recoating direction), a short powder feed, a super-elevated part edge, or spatter.
Defects fall on the plate only, on powder or parts. Every layer gets its own random exposure,
larger than any effect a defect has on the image mean or spread, so global statistics do not give
the label away.

Output of ``generate(out, cfg)``::

    out/manifest.csv                   path,label,job,layer,printer,mask
    out/printers.json                  per printer: the plate rectangle (px and fractions), ...
    out/<label>/<job>__<layer>.png     layer images, one folder per class
    out/_masks/<job>__<layer>.png      defect masks (0 background, 255 defect)
    out/_parts/<job>__<layer>.png      part masks (0 powder, 255 fused part); only with parts on

Only numpy and OpenCV are used (no torch): the generator runs on the scoring install too.
"""

from __future__ import annotations

import json
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
from inspect3d.data.manifest import MASK_DIR, Item, write_manifest
from inspect3d.errors import InspectError

CLASSES = ("ok", "streak", "short_feed", "super_elevation", "spatter")
NORMAL_CLASS = "ok"
DEFECTS = CLASSES[1:]
PARTS_DIR = "_parts"
MANIFEST = "manifest.csv"
PRINTERS_FILE = "printers.json"
SHAPES = ("disc", "ring", "hexagon", "tab", "l_shape")  # part cross-sections

# Independent random streams of one seed: (seed, stream, ...). Jobs, printers, the job-to-defect
# assignment and the parts never share numbers, so changing one leaves the others alone: with
# parts off (or another number of parts) a job keeps its powder, exposure and defects.
_JOB_STREAM, _PRINTER_STREAM, _ASSIGN_STREAM, _PARTS_STREAM, _FRAME_STREAM = 0, 1, 2, 3, 4
_POWDER = 100.0  # grey level of fresh powder under average light, before exposure
_PIVOT = 90.0  # grey level that contrast jitter turns around
_N_VERTICES = 128  # vertices of a round outline; straight outlines get about as many
_ANGLES = np.linspace(0.0, 2 * np.pi, _N_VERTICES, endpoint=False)
_PROFILES = ("prism", "cone", "sphere", "flare", "overhang")
_MAX_PRINTERS = 26
_MAX_PARTS = 12
_FLEET_SEED = 0
_HATCH_TURN = math.radians(67)  # the laser's hatch direction turns by this much every layer
_Gen = np.random.Generator
_Rect = tuple[int, int, int, int]  # x0, y0, x1, y1 px; x1, y1 exclusive (image[y0:y1, x0:x1])


@dataclass(frozen=True)
class SynthConfig:
    """What to generate; the same config always gives byte-identical files."""

    seed: int = 0
    n_jobs: int = 16
    layers_per_job: int = 20
    size: int = 512  # layers are size x size, grey uint8
    defect_fraction: float = 0.7  # share of jobs that develop a defect
    printers: int = 2  # printer names "synth-a", "synth-b", ...
    frame: bool = True  # the machine frame around the plate is in view (else: plate only)
    parts: bool = True  # fused parts on the plate, their masks in _parts/ (else: powder only)
    min_parts: int = 2  # parts per job: min_parts..max_parts (fewer where the plate is full)
    max_parts: int = 6
    overwrite: bool = False


@dataclass(frozen=True, eq=False)
class SynthLayer:
    """One rendered layer: the image and its masks, all uint8 size x size."""

    image: np.ndarray
    mask: np.ndarray  # 255 defect, 0 elsewhere
    parts: np.ndarray  # 255 fused part, 0 powder (all 0 with parts off)
    label: str


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
        text = json.dumps(printers_info(cfg), indent=2, sort_keys=True)
        (tmp / PRINTERS_FILE).write_text(text + "\n", encoding="utf-8")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [_below(out, it) for it in rel]


def render_layers(cfg: SynthConfig, job_index: int) -> list[SynthLayer]:
    """Every layer of one job, with its defect and part masks; pure, deterministic."""
    _check_config(cfg)
    if not 0 <= job_index < cfg.n_jobs:
        raise InspectError(f"job_index={job_index!r} is not valid: use 0..{cfg.n_jobs - 1}")
    seeds = np.random.SeedSequence([cfg.seed, _JOB_STREAM, job_index]).spawn(cfg.layers_per_job + 1)
    job = _make_job(cfg, job_index, np.random.default_rng(seeds[0]))
    return [
        _render_layer(job, layer, np.random.default_rng(seeds[layer + 1]))
        for layer in range(cfg.layers_per_job)
    ]


def render_job(cfg: SynthConfig, job_index: int) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """(image uint8 HxW, mask uint8 HxW 0/255, label) per layer of one job; pure, deterministic."""
    return [(s.image, s.mask, s.label) for s in render_layers(cfg, job_index)]


def job_name(cfg: SynthConfig, job_index: int) -> str:
    """Name of job ``job_index``: job000, job001, ... (wider when there are more jobs)."""
    return f"job{job_index:0{max(3, len(str(cfg.n_jobs - 1)))}d}"


def printer_name(index: int) -> str:
    """Name of printer ``index``: synth-a, synth-b, ..."""
    return f"synth-{chr(ord('a') + index)}"


def plate_rect(cfg: SynthConfig, printer_index: int) -> _Rect:
    """The build plate of printer ``printer_index`` in its layers: (x0, y0, x1, y1) px, x1 and y1
    exclusive (``image[y0:y1, x0:x1]``). Everything outside it is frame; defects fall inside."""
    _check_config(cfg)
    _check_int("printer_index", printer_index, 0, cfg.printers - 1)
    return _plate_px(_printer(printer_index), cfg.size, cfg.frame)


def printers_info(cfg: SynthConfig) -> dict[str, dict]:
    """What ``printers.json`` holds: per printer name, its plate rectangle in pixels and as
    fractions of the layer (a region of interest), the layer size and the recoating direction."""
    info = {}
    for index in range(cfg.printers):
        x0, y0, x1, y1 = plate_rect(cfg, index)
        px = {"x0": x0, "y0": y0, "x1": x1, "y1": y1}
        info[printer_name(index)] = {
            "size": cfg.size,
            "frame": cfg.frame,
            "plate_px": px,
            "plate_frac": {k: round(v / cfg.size, 6) for k, v in px.items()},
            "recoater": "down" if _printer(index).feed_down else "up",
        }
    return info


# ----------------------------------------------------------------------------------------------
# validation and output folder


def _check_config(cfg: SynthConfig) -> None:
    _check_int("seed", cfg.seed, 0)
    _check_int("n_jobs", cfg.n_jobs, 1)
    _check_int("layers_per_job", cfg.layers_per_job, 2)
    _check_int("size", cfg.size, 64)
    _check_int("printers", cfg.printers, 1, _MAX_PRINTERS)
    _check_int("min_parts", cfg.min_parts, 1, _MAX_PARTS)
    _check_int("max_parts", cfg.max_parts, cfg.min_parts, _MAX_PARTS, "(at least min_parts)")
    for name in ("frame", "parts", "overwrite"):
        value = getattr(cfg, name)
        if not isinstance(value, (bool, np.bool_)):
            raise InspectError(f"{name}={value!r} is not valid: use true or false")
    f = cfg.defect_fraction
    if isinstance(f, bool) or not isinstance(f, Real) or not 0.0 <= f <= 1.0:
        raise InspectError(
            f"defect_fraction={f!r} is not valid: use a number from 0 (no defects) to 1 (all jobs)"
        )


def _check_int(name: str, value: object, low: int, high: int | None = None, why: str = "") -> None:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if ok and value >= low and (high is None or value <= high):
        return
    valid = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
    raise InspectError(f"{name}={value!r} is not valid: use {valid}" + (f" {why}" if why else ""))


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
        for layer, rendered in enumerate(render_layers(cfg, j)):
            name = layer_file_name(job, layer)
            _write_png(root / rendered.label / name, rendered.image)
            _write_png(root / MASK_DIR / name, rendered.mask)
            if cfg.parts:
                _write_png(root / PARTS_DIR / name, rendered.parts)
            mask = Path(MASK_DIR, name)
            items.append(
                Item(Path(rendered.label, name), rendered.label, job, layer, printer, mask)
            )
    return items


def _write_png(path: Path, array: np.ndarray) -> None:
    # imencode + write_bytes instead of imwrite: works with any path and reports failures
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(buf.tobytes())


# ----------------------------------------------------------------------------------------------
# printers: light, plate and frame


@dataclass(frozen=True)
class _Printer:
    index: int
    gain: float  # brightness of its light
    light_dir: tuple[float, float]  # unit vector (x, y) towards the brighter side of the bed
    gradient: float  # relative brightness change across the bed
    vignette: float  # relative darkening at the corners
    feed_down: bool  # recoater moves down the image: the far end of the bed is at the bottom
    margins: tuple[float, float, float, float]  # frame width left, top, right, bottom (fractions)
    frame_level: float  # grey level of the frame's metal (bright aluminium or dark steel)


def _printer(index: int) -> _Printer:
    # A printer is the same machine whatever the seed: sets made with other seeds are new jobs
    # on the same fleet (a held-out set then tests new jobs, not an unseen camera set-up).
    rng = _rng(_FLEET_SEED, _PRINTER_STREAM, index)
    angle = rng.uniform(0, 2 * np.pi)
    light = {
        "gain": float(rng.uniform(0.9, 1.1)),
        "light_dir": (math.cos(angle), math.sin(angle)),
        "gradient": float(rng.uniform(0.3, 0.5)),
        "vignette": float(rng.uniform(0.15, 0.3)),
        "feed_down": bool(rng.random() < 0.5),
    }
    # the frame from its own stream: the camera's placement differs a little between printers
    rng = _rng(_FLEET_SEED, _FRAME_STREAM, index)
    wx, wy = rng.uniform(0.065, 0.095, size=2)  # frame width left + right, top + bottom, halved
    dx, dy = rng.uniform(-0.015, 0.015, size=2)  # the plate sits a little off the image centre
    margins = (float(wx + dx), float(wy + dy), float(wx - dx), float(wy - dy))
    bright = index % 2 == 1  # a fleet of both kinds: dark steel, bright aluminium, ...
    level = float(rng.uniform(125, 150) if bright else rng.uniform(35, 60))
    return _Printer(index=index, margins=margins, frame_level=level, **light)


def _plate_px(printer: _Printer, size: int, frame: bool) -> _Rect:
    if not frame:
        return 0, 0, size, size
    left, top, right, bottom = (round(m * size) for m in printer.margins)
    return left, top, size - right, size - bottom


def _render_frame(printer: _Printer, size: int, plate: _Rect) -> np.ndarray:
    """The machine around the plate in grey levels: brushed metal with a gradient and a
    reflection, recoater rails along the sides, bolt holes, a dark gap around the plate.
    Drawn from the printer alone, so it is the same on every layer of every job."""
    rng = _rng(_FLEET_SEED, _FRAME_STREAM, printer.index, size)
    u = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    xx, yy = u[None, :], u[:, None]
    a, b = rng.uniform(0, 2 * np.pi, size=2)
    level = printer.frame_level * (1 + 0.15 * (xx * math.cos(a) + yy * math.sin(a)))
    glare = np.exp(-(((xx * math.cos(b) + yy * math.sin(b) - rng.uniform(-0.5, 0.5)) / 0.2) ** 2))
    frame = level * (1 + 0.3 * glare) + _brushed(rng, size, plate)
    _draw_rails(frame, plate, printer.frame_level)
    _draw_bolts(frame, plate, rng, printer.frame_level)
    return frame.astype(np.float32)


def _brushed(rng: _Gen, size: int, plate: _Rect) -> np.ndarray:
    """Brushed-metal grain, drawn out along each bar of the frame (vertical at the sides)."""
    x0, _, x1, _ = plate
    noise = rng.standard_normal((size, size), dtype=np.float32)
    along_x, along_y = cv2.blur(noise, (15, 1)), cv2.blur(noise, (1, 15))
    cols = np.arange(size)[None, :]
    grain = np.where((cols < x0) | (cols >= x1), along_y, along_x)
    return 5.0 * grain / (float(grain.std()) + 1e-6)


def _draw_rails(frame: np.ndarray, plate: _Rect, level: float) -> None:
    """A polished rail in the middle of each side bar (the recoater runs on them), grooves
    beside it, and a dark gap right around the plate."""
    x0, y0, x1, y1 = plate
    size = frame.shape[0]
    for start, stop in ((0, x0), (x1, size)):
        width = stop - start
        ra, rb = start + round(0.3 * width), start + max(round(0.6 * width), round(0.3 * width) + 1)
        frame[:, ra:rb] += 0.25 * level + 15
        frame[:, max(ra - 1, 0)] -= 0.4 * level
        frame[:, min(rb, size - 1)] -= 0.4 * level
    gap = np.zeros(frame.shape, np.uint8)
    cv2.rectangle(gap, (x0 - 1, y0 - 1), (x1, y1), 255, 1)  # the pixels just outside the plate
    frame -= (gap > 0) * (0.5 * level)


def _draw_bolts(frame: np.ndarray, plate: _Rect, rng: _Gen, level: float) -> None:
    """Bolt holes along the top and bottom bars: a dark hole with a bright rim."""
    x0, y0, x1, y1 = plate
    size = frame.shape[0]
    holes, rims = np.zeros((size, size), np.uint8), np.zeros((size, size), np.uint8)
    for top, bottom in ((0, y0), (y1, size)):
        radius = max(1.0, 0.22 * (bottom - top))
        cy = (top + bottom) / 2
        n = max(2, round((x1 - x0) / (0.15 * size)))
        for cx in np.linspace(x0 + 2 * radius, x1 - 2 * radius, n) + rng.uniform(-1, 1, n):
            c, r = (round(cx * 16), round(cy * 16)), round(radius * 16)
            cv2.circle(rims, c, r + 16, 255, -1, cv2.LINE_AA, shift=4)
            cv2.circle(holes, c, r, 255, -1, cv2.LINE_AA, shift=4)
    frame += (rims.astype(np.float32) / 255) * (0.3 * level + 20)
    frame -= (holes.astype(np.float32) / 255) * (0.3 * level + 20 + 0.6 * level)


# ----------------------------------------------------------------------------------------------
# jobs: plate, parts, defect plan


@dataclass(frozen=True, eq=False)
class _Part:
    center: np.ndarray  # (x, y) px at the first layer
    radius: float  # px, largest outline radius at full scale
    rings: tuple[np.ndarray, ...]  # unit outline (N x 2, max radius 1), then holes
    shape: str  # one of SHAPES
    profile: str  # how the cross-section changes with height (one of _PROFILES)
    drift: np.ndarray  # (x, y) px the cross-section moves over the whole job (overhangs lean)


@dataclass(frozen=True)
class _PartLook:
    """How a job's fused metal looks (its material and laser settings)."""

    level: float  # brightness relative to powder under the same light
    contour: float  # grey levels of the melted contour along the outline
    hatch: float  # grey levels of the laser's hatch lines
    period: float  # px between hatch lines
    angle: float  # hatch direction at the first layer (radians)


@dataclass(frozen=True, eq=False)
class _Job:
    size: int
    n_layers: int
    printer: _Printer
    light: np.ndarray  # float32 HxW: grey level of fresh powder
    plate: _Rect  # the build plate; the frame is outside it
    frame: np.ndarray | None  # float32 HxW: grey level of the machine (None: plate fills view)
    mottle: np.ndarray  # float32 HxW: static low-frequency powder unevenness, unit spread
    box: _Rect  # a rectangle a few pixels inside the plate
    parts: tuple[_Part, ...]  # where parts are (also with parts off: defects need them)
    look: _PartLook | None  # None: the parts are not drawn (powder only)
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


def _make_job(cfg: SynthConfig, job_index: int, rng: _Gen) -> _Job:
    size, n_layers = cfg.size, cfg.layers_per_job
    printer = _printer(job_index % cfg.printers)
    plate = _plate_px(printer, size, cfg.frame)
    box = (plate[0] + 3, plate[1] + 3, plate[2] - 3, plate[3] - 3)
    defect = _job_defects(cfg)[job_index]
    onset = int(rng.integers(1, max(1, int(0.7 * (n_layers - 1))) + 1)) if defect else n_layers
    parts_rng = _rng(cfg.seed, _PARTS_STREAM, job_index)
    n_parts = int(parts_rng.integers(cfg.min_parts, cfg.max_parts + 1))
    job = _Job(
        size=size,
        n_layers=n_layers,
        printer=printer,
        light=_lighting(printer, size, rng),
        plate=plate,
        frame=_render_frame(printer, size, plate) if cfg.frame else None,
        mottle=_smooth_noise(rng, (size, size), size // 8),
        box=box,
        parts=_make_parts(parts_rng, size, box, n_parts),
        look=_part_look(parts_rng) if cfg.parts else None,
        defect=defect,
        onset=onset,
    )
    if defect:
        job.plan.update(_PLANNERS[defect](job, rng))
    return job


def _lighting(printer: _Printer, size: int, rng: _Gen) -> np.ndarray:
    u = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    xx, yy = u[None, :], u[:, None]
    lx, ly = printer.light_dir
    gradient = 1 + printer.gradient * (xx * lx + yy * ly) / math.sqrt(2)
    vignette = 1 - printer.vignette * (xx**2 + yy**2) / 2
    level = _POWDER * printer.gain * rng.uniform(0.97, 1.03)
    return (level * gradient * vignette).astype(np.float32)


def _part_look(rng: _Gen) -> _PartLook:
    return _PartLook(
        level=float(rng.choice([-1, 1]) * rng.uniform(0.12, 0.25)),
        contour=float(rng.uniform(25, 45)),
        hatch=float(rng.uniform(0.6, 1.2)),
        period=float(rng.uniform(4.0, 7.0)),
        angle=float(rng.uniform(0, np.pi)),
    )


def _circle(radius: float) -> np.ndarray:
    return radius * np.stack([np.cos(_ANGLES), np.sin(_ANGLES)], axis=1)


def _make_parts(rng: _Gen, size: int, box: _Rect, n: int) -> tuple[_Part, ...]:
    """``n`` parts placed without overlap, far enough inside the plate for spatter around them;
    a part that finds no free spot tries smaller, and is left out when even that fails."""
    parts: list[_Part] = []
    tries = 60
    for _ in range(n):
        for attempt in range(tries):  # rejection sampling of a free spot; the shape comes after
            part = _random_spot(rng, size, box, 1.0 - 0.6 * attempt / tries)
            if part is not None and all(_apart(part, p) for p in parts):
                shape = str(rng.choice(SHAPES))
                parts.append(replace(part, shape=shape, rings=_unit_shape(shape, rng)))
                break
    if not parts:  # tiny plates: one disc in the middle
        x0, y0, x1, y1 = box
        center = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
        parts.append(_Part(center, 0.08 * size, _UNIT_DISC, "disc", "prism", np.zeros(2)))
    return tuple(parts)


def _random_spot(rng: _Gen, size: int, box: _Rect, shrink: float) -> _Part | None:
    """A round part of random size, growth profile and place, or None if it does not fit."""
    radius = float(rng.uniform(0.05, 0.11) * size * shrink)
    profile = str(rng.choice(_PROFILES))
    drift = rng.uniform(-0.4, 0.4, size=2) * radius if profile == "overhang" else np.zeros(2)
    margin = 1.7 * radius + 6 + np.abs(drift)
    x0, y0, x1, y1 = box
    if x1 - x0 <= 2 * margin[0] or y1 - y0 <= 2 * margin[1]:
        return None
    low, high = np.array([x0, y0]) + margin, np.array([x1, y1]) - margin
    center = rng.uniform(low, high)
    return _Part(center, radius, _UNIT_DISC, "disc", profile, drift)


_UNIT_DISC = (_circle(1.0),)


def _apart(a: _Part, b: _Part) -> bool:
    return float(np.linalg.norm(a.center - b.center)) > 1.3 * (a.radius + b.radius) + 4


def _unit_shape(shape: str, rng: _Gen) -> tuple[np.ndarray, ...]:
    """Outline of a part (and its holes), rotated at random, scaled to max radius 1."""
    if shape == "disc":
        rings = [_circle(1.0) * [1.0, rng.uniform(0.8, 1.0)]]  # a little elliptic
    elif shape == "ring":
        rings = [_circle(1.0), _circle(float(rng.uniform(0.45, 0.7)))]
    elif shape == "hexagon":
        corners = np.linspace(0, 2 * np.pi, 6, endpoint=False)
        rings = [_densify(np.stack([np.cos(corners), np.sin(corners)], axis=1))]
    elif shape == "tab":
        w, h = 1.0, rng.uniform(0.25, 0.7)
        rings = [_densify(np.array([[-w, -h], [w, -h], [w, h], [-w, h]]))]
    else:  # l_shape: two arms of thickness t
        t = rng.uniform(0.3, 0.5)
        corners = np.array([[0, 0], [1, 0], [1, t], [t, t], [t, 1], [0, 1]]) - 0.5
        rings = [_densify(corners)]
    phi = rng.uniform(0, 2 * np.pi)
    turn = np.array([[math.cos(phi), math.sin(phi)], [-math.sin(phi), math.cos(phi)]])
    scale = float(np.linalg.norm(rings[0], axis=1).max())
    return tuple(r @ turn / scale for r in rings)


def _densify(corners: np.ndarray) -> np.ndarray:
    """A closed polygon with points along its edges (about _N_VERTICES), corners kept."""
    ends = np.roll(corners, -1, axis=0)
    lengths = np.linalg.norm(ends - corners, axis=1)
    counts = np.maximum(1, np.rint(_N_VERTICES * lengths / lengths.sum()).astype(int))
    steps = zip(corners, ends, counts, strict=True)
    pieces = [a + (b - a) * (np.arange(k) / k)[:, None] for a, b, k in steps]
    return np.concatenate(pieces)


def _part_scale(profile: str, f: float) -> float:
    """Cross-section size at height ``f`` (0 first layer .. 1 last) relative to full size."""
    if profile == "cone":
        return 1.0 - 0.5 * f
    if profile == "sphere":
        return 0.5 + 0.5 * math.sin(math.pi * (0.15 + 0.7 * f))
    if profile == "flare":
        return 0.55 + 0.45 * f
    return 1.0  # prism, overhang (which moves instead)


def _outline(part: _Part, f: float) -> list[np.ndarray]:
    """Part cross-section at height ``f``: outline, then holes, as N x 2 (x, y) px polygons."""
    center = part.center + part.drift * f
    scale = part.radius * _part_scale(part.profile, f)
    return [center + scale * ring for ring in part.rings]


# ----------------------------------------------------------------------------------------------
# layers


def _render_layer(job: _Job, layer: int, rng: _Gen) -> SynthLayer:
    f = layer / (job.n_layers - 1)
    # gain, contrast, offset: drawn first and whatever the layer shows, so exposure is no cue
    exposure = rng.uniform([0.78, 0.8, -16.0], [1.22, 1.2, 16.0])
    rings = [ring for part in job.parts for ring in _outline(part, f)]
    cover = _fill(job.size, rings)  # even-odd fill: holes stay powder
    image = job.light + _powder(job, rng)
    if job.look is not None:
        image = _fuse(job, image, cover, rings, layer)
    mask = np.zeros((job.size, job.size), np.uint8)
    label = job.defect if job.defect is not None and layer >= job.onset else NORMAL_CLASS
    if label != NORMAL_CLASS:
        _DRAWERS[label](job, image, mask, layer, cover, rng)
    image = _with_frame(job, image)
    image += 1.5 * rng.standard_normal(image.shape, dtype=np.float32)  # camera noise
    parts = (cover > 0.5) if job.look is not None else np.zeros_like(mask, bool)
    return SynthLayer(
        image=_expose(image, *exposure),
        mask=_on_plate(job.plate, mask),
        parts=_on_plate(job.plate, parts.astype(np.uint8) * 255),
        label=label,
    )


def _powder(job: _Job, rng: _Gen) -> np.ndarray:
    """Fresh powder texture in grey levels: grain, recoater drag marks, slow unevenness."""
    size = job.size
    grain = cv2.GaussianBlur(rng.standard_normal((size, size), dtype=np.float32), (0, 0), 0.7)
    # the recoater drags grains along its path: faint short streaks in the recoating direction
    drag = cv2.blur(rng.standard_normal((size, size), dtype=np.float32), (1, 7))
    mottle = 0.85 * job.mottle + 0.15 * _smooth_noise(rng, (size, size), size // 8)
    return 10.0 * grain + 2.5 * drag + 2.0 * mottle


def _fuse(
    job: _Job, image: np.ndarray, cover: np.ndarray, rings: list[np.ndarray], layer: int
) -> np.ndarray:
    """Fused metal where ``cover`` says: smoother than powder, its own brightness, faint hatch
    lines turning every layer, and a bright melted contour just inside the outline."""
    look, size = job.look, job.size
    angle = look.angle + _HATCH_TURN * layer
    xy = np.arange(size, dtype=np.float32)
    along = xy[None, :] * math.cos(angle) + xy[:, None] * math.sin(angle)
    hatch = look.hatch * np.sin(2 * np.pi / look.period * along)
    edge = np.zeros((size, size), np.uint8)
    thick = 2 * max(1, round(size / 256))  # half of it lies inside the part
    pts = [np.rint(r * 16).astype(np.int32) for r in rings]
    cv2.polylines(edge, pts, True, 255, thick, cv2.LINE_AA, shift=4)
    contour = edge.astype(np.float32) / 255
    metal = job.light * (1 + look.level) + 0.25 * (image - job.light) + hatch
    return image + cover * (metal - image + look.contour * contour)


def _with_frame(job: _Job, image: np.ndarray) -> np.ndarray:
    """The plate from ``image``, the frame around it."""
    if job.frame is None:
        return image
    x0, y0, x1, y1 = job.plate
    out = job.frame.copy()
    out[y0:y1, x0:x1] = image[y0:y1, x0:x1]
    return out


def _on_plate(plate: _Rect, mask: np.ndarray) -> np.ndarray:
    """``mask`` with everything off the plate cleared."""
    x0, y0, x1, y1 = plate
    out = np.zeros_like(mask)
    out[y0:y1, x0:x1] = mask[y0:y1, x0:x1]
    return out


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
# Every defect lies inside job.box, on the plate; _render_layer clears whatever spills over.


def _plan_streak(job: _Job, rng: _Gen) -> dict:
    """1 to 4 recoater streaks, 1 to 3 px wide; the first at onset, the others join later (they
    multiply). Most run along the recoating direction from where a nick in the blade picked up a
    grain to the far end of the bed; some run across the bed, where the blade hopped."""
    n = int(rng.integers(1, 5))
    across = rng.random(n) < 0.25
    starts = np.sort(rng.integers(job.onset, job.n_layers, size=n))
    starts[0] = job.onset
    taken: dict[bool, list[int]] = {False: [], True: []}
    streaks = []
    for is_across, start in zip(across.tolist(), starts, strict=True):
        pos = _streak_position(job.box, is_across, taken[is_across], rng)
        if pos is None:  # no room for another one in that direction
            continue
        taken[is_across].append(pos)
        a, b = _streak_span(job, is_across, rng)
        width = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
        amp = float(rng.choice([-1, 1]) * rng.uniform(8, 14))  # dark or bright: no mean shift
        streaks.append((is_across, pos, width, a, b, amp, int(start)))
    return {"streaks": streaks}


def _streak_position(box: _Rect, across: bool, taken: list[int], rng: _Gen) -> int | None:
    """Column (along) or row (across) of a new streak, >= 5 px from the others that way, so
    each stays a separate thin line."""
    x0, y0, x1, y1 = box
    low, high = (y0 + 2, y1 - 4) if across else (x0 + 2, x1 - 4)
    for _ in range(50):
        pos = int(rng.integers(low, high))
        if all(abs(pos - other) >= 5 for other in taken):
            return pos
    return None


def _streak_span(job: _Job, across: bool, rng: _Gen) -> tuple[int, int]:
    """Where a streak starts and ends along its direction (px, end exclusive)."""
    x0, y0, x1, y1 = job.box
    if across:  # a hop marks most of the blade's width
        length = int(rng.uniform(0.7, 1.0) * (x1 - x0))
        a = x0 + int(rng.integers(0, x1 - x0 - length + 1))
        return a, a + length
    length = int(rng.uniform(0.55, 1.0) * (y1 - y0))  # from the pick-up point to the far end
    return (y1 - length, y1) if job.printer.feed_down else (y0, y0 + length)


def _draw_streak(
    job: _Job, image: np.ndarray, mask: np.ndarray, layer: int, parts: np.ndarray, rng: _Gen
) -> None:
    for across, pos, width, a, b, amp, start in job.plan["streaks"]:
        if layer < start:
            continue
        profile = amp * (0.8 + 0.2 * _smooth_noise(rng, (b - a, 1), 16))  # uneven along it
        if across:
            image[pos : pos + width, a:b] += profile.T
            mask[pos : pos + width, a:b] = 255
        else:
            image[a:b, pos : pos + width] += profile
            mask[a:b, pos : pos + width] = 255


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
        "at": float(rng.random()),  # where along the outline, as a fraction of it
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
    outline = _outline(job.parts[plan["part"]], layer / (job.n_layers - 1))[0]
    n = len(outline)
    step = _perimeter(outline) / n
    half = round((plan["length"] + plan["growth"] * t) / 2 / step)
    half = min(max(1, half), n // 4)  # long jobs: at most half the outline lifts
    edge = outline[(int(plan["at"] * n) + np.arange(-half, half + 1)) % n]
    thick = min(2 + t // 3, 5)
    edge = edge + _outward(outline, edge) * 0.4 * thick  # lifted just outside
    # the raised edge casts its shadow away from the light
    shadow = edge - np.array(job.printer.light_dir) * (thick + 2.0)
    dark = _stroke(job.size, shadow, thick, mask)
    bright = _stroke(job.size, edge, thick, mask)
    gain = rng.uniform(0.85, 1.15)
    image += plan["bright"] * gain * bright - plan["shadow"] * dark * (1 - bright)


def _perimeter(polygon: np.ndarray) -> float:
    return float(np.linalg.norm(np.roll(polygon, -1, axis=0) - polygon, axis=1).sum())


def _outward(polygon: np.ndarray, stretch: np.ndarray) -> np.ndarray:
    """Unit normal pointing out of ``polygon`` at the open ``stretch`` of its outline."""
    x, y = polygon[:, 0], polygon[:, 1]
    area = float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))  # > 0: one turning sense
    tx, ty = stretch[-1] - stretch[0]
    normal = np.array([ty, -tx]) if area > 0 else np.array([-ty, tx])
    return normal / (float(np.linalg.norm(normal)) + 1e-6)


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
    """Spatter particles (2 to 6 px) near and on the parts; fresh ones every layer."""
    count = 1 + int(rng.poisson(job.plan["rate"] * rng.uniform(0.5, 1.5)))
    f = layer / (job.n_layers - 1)
    x0, y0, x1, y1 = job.box
    bright, dark = np.zeros((job.size, job.size), np.uint8), np.zeros_like(mask)
    for _ in range(count):
        part = job.parts[int(rng.integers(len(job.parts)))]
        angle = rng.uniform(0, 2 * np.pi)
        dist = part.radius * _part_scale(part.profile, f) * rng.uniform(0.5, 1.6) + 3
        xy = part.center + part.drift * f + dist * np.array([math.cos(angle), math.sin(angle)])
        xy = np.clip(xy, [x0 + 3, y0 + 3], [x1 - 4, y1 - 4])  # the whole blob on the plate
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
