"""Normal-only maps on a synthetic printer with a machine frame and parts of new shapes.

Fitted on the good layers of one printer's jobs, scored (through the exported ONNX model, as
the watcher scores) on other jobs of the same printer, whose parts have other shapes and
places: the ROI keeps the frame out, new parts pass, and maps peak on the defects.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from inspect3d.data.manifest import scan_folder
from inspect3d.errors import InspectError
from inspect3d.localisation import peak_on_defect, resize_map
from inspect3d.metrics import auroc
from inspect3d.train.evaluate import mask_metrics

from conftest import compose
from isolate import isolated

SIZE = 256
PRINTER = "synth-a"


def printer_set(out: Path, seed: int, n_jobs: int, defect_fraction: float) -> Path:
    from inspect3d.data.synth import SynthConfig, generate

    cfg = SynthConfig(
        seed=seed, n_jobs=n_jobs, layers_per_job=8, size=SIZE, defect_fraction=defect_fraction
    )
    generate(out, cfg, progress=False)
    return out


def good_layers_of(src: Path, dest: Path, printer: str) -> Path:
    """``dest/ok/`` and ``dest/_parts/``: links to ``printer``'s good layers in ``src``."""
    rows = [line.split(",") for line in (src / "manifest.csv").read_text().splitlines()[1:]]
    for sub in ("ok", "_parts"):
        (dest / sub).mkdir(parents=True)
    for path, label, _job, _layer, who, *_ in rows:
        if label == "ok" and who == printer:
            name = Path(path).name
            os.symlink(src / path, dest / "ok" / name)
            os.symlink(src / "_parts" / name, dest / "_parts" / name)
    return dest


def fit_export_score(fit_root: Path, test_paths: list[Path], run: Path, *extra: str) -> dict:
    """Fit, export and score ``test_paths`` with the ONNX model (runs in the worker)."""
    from inspect3d.export.onnx import export_run
    from inspect3d.infer import OnnxModel
    from inspect3d.normal.fit import fit_normal

    overrides = [
        "data=folder", f"data.root={fit_root}", "data.normal_class=ok", "normal.progress=false",
        "normal.use_parts=true", *extra,
    ]  # fmt: skip
    fit_normal(compose("fit_normal", overrides), run)
    export_run(compose("export", [f"run={run}", "n_check=2"]))
    model = OnnxModel.load(run / "model.onnx")
    scores = [model.predict(str(p), parts_of(p)) for p in test_paths]
    return {
        "meta": {"roi": model.meta.roi, "map_threshold": model.map_threshold},
        "scores": [(s.defect_score, s.decision, s.defect_map) for s in scores],
        "metrics": json.loads((run / "metrics.json").read_text()),
    }


def parts_of(layer: Path) -> Path | None:
    """The layer's part mask, as a shop's CAD slices give it (``ROOT/_parts/<name>``)."""
    mask = layer.parent.parent / "_parts" / layer.name
    return mask if mask.is_file() else None


@pytest.fixture(scope="module")
def printer_a(tmp_path_factory):
    root = tmp_path_factory.mktemp("printer")
    fit_src = printer_set(root / "fit_src", seed=5, n_jobs=8, defect_fraction=0.2)
    test_src = printer_set(root / "test_src", seed=6, n_jobs=12, defect_fraction=0.8)
    fit = good_layers_of(fit_src, root / "fit", PRINTER)
    rows = [line.split(",") for line in (test_src / "manifest.csv").read_text().splitlines()[1:]]
    tests = [(test_src / r[0], r[1]) for r in rows if r[4] == PRINTER]
    scored = isolated(fit_export_score, fit, [p for p, _ in tests], root / "run")
    return {"fit": fit, "test_src": test_src, "tests": tests, "run": root / "run", **scored}


def plate_of(data: Path) -> dict:
    return json.loads((data / "printers.json").read_text())[PRINTER]["plate_px"]


def test_auto_roi_finds_the_plate_and_the_map_is_zero_on_the_frame(printer_a):
    poly = np.array(printer_a["meta"]["roi"])
    plate = plate_of(printer_a["test_src"])
    frac = {k: v / SIZE for k, v in plate.items()}
    (x0, y0), (x1, y1) = poly.min(0), poly.max(0)
    assert abs(x0 - frac["x0"]) < 0.03 and abs(x1 - frac["x1"]) < 0.03
    assert abs(y0 - frac["y0"]) < 0.03 and abs(y1 - frac["y1"]) < 0.03
    for _, _, dmap in printer_a["scores"]:
        full = resize_map(dmap, (SIZE, SIZE))
        frame = np.ones((SIZE, SIZE), bool)
        frame[plate["y0"] - 8 : plate["y1"] + 8, plate["x0"] - 8 : plate["x1"] + 8] = False
        assert full[frame].max() == 0.0


def test_new_part_shapes_pass_and_defect_layers_are_flagged(printer_a):
    labels = np.array([label for _, label in printer_a["tests"]])
    flagged = np.array([decision == "defect" for _, decision, _ in printer_a["scores"]])
    good = labels == "ok"
    assert good.sum() >= 8 and (~good).sum() >= 8
    assert flagged[good].mean() <= 0.15, f"{flagged[good].sum()} of {good.sum()} good flagged"
    scores = np.array([score for score, _, _ in printer_a["scores"]])
    assert auroc(~good, scores) >= 0.75  # 0.81 measured at 256 px
    # 6/31 measured: faint synthetic defects at 256 px, whitened bank with part masks (12/31
    # unwhitened: whitening trades layer recall here for maps that peak on the defect at 512 px)
    assert flagged[~good].mean() >= 0.15


def test_map_ranks_in_threshold_units_and_peaks_on_the_defect(printer_a):
    assert printer_a["meta"]["map_threshold"] == 1.0
    maps = np.stack([m for _, _, m in printer_a["scores"]])
    assert maps.max() > 1.0 and (maps >= 0.999).mean() < 0.05  # no saturated plateau
    items = [it for it in scan_folder(printer_a["test_src"]) if _is_tested(it, printer_a)]
    order = {str(p): i for i, (p, _) in enumerate(printer_a["tests"])}
    sel = np.array([order[str(it.path)] for it in items])
    m = mask_metrics(items, maps[sel], printer_a["test_src"] / "_masks", 1.0)
    # 0.87, 0.50 and 0.74 measured at 256 px with part masks and the whitened bank (0.90, 0.70
    # and 0.77 unwhitened); at 512 px without masks (the defaults) 0.93, 0.93 and 0.84
    assert m["pixel_auroc"] >= 0.85 and m["aupro_30"] >= 0.45, m
    assert m["peak_on_defect"]["rate"] >= 0.65, m["peak_on_defect"]


def test_streak_maps_peak_on_the_streak(printer_a):
    hits = []
    for (path, label), (_, _, dmap) in zip(printer_a["tests"], printer_a["scores"], strict=True):
        if label == "streak":
            mask = cv2.imread(str(printer_a["test_src"] / "_masks" / path.name), 0) > 0
            hits.append(peak_on_defect(resize_map(dmap, mask.shape), mask))
    assert hits and np.mean(hits) >= 0.6, hits


def test_part_masks_give_parts_their_share_of_the_bank(printer_a):
    bank = printer_a["metrics"]["bank"]
    assert bank["part_cells"] > 0 and bank["part_size"] == 512 and bank["size"] == 1536
    assert bank["part_scale"] > 0


def test_the_watcher_reads_part_masks_beside_the_layer(printer_a, tmp_path):
    from inspect3d.infer import OnnxModel
    from inspect3d.watch.inbox import Arrival
    from inspect3d.watch.scoring import part_cells_of

    model = OnnxModel.load(printer_a["run"] / "model.onnx")
    job = tmp_path / "inbox" / "p1" / "job1"
    (job / "_parts").mkdir(parents=True)
    layer, mask = printer_a["tests"][0][0], np.zeros((SIZE, SIZE), np.uint8)
    mask[100:140, 60:90] = 255
    cv2.imwrite(str(job / "_parts" / "l1.png"), mask)
    arrivals = [Arrival(job / name, f"p1/job1/{name}", "p1", "job1", 1, 1, 0.0)
                for name in ("l1.png", "l2.png")]  # fmt: skip
    cells = part_cells_of(model, arrivals)
    assert cells.shape[:2] == (2, 1) and cells[0].sum() > 0 and cells[1].sum() == 0
    h, w = cells.shape[2:]
    assert cells[0, 0, 120 * h // SIZE, 75 * w // SIZE] == 1 and cells[0, 0, 10, 10] == 0
    assert layer.is_file()


def _is_tested(item, printer_a) -> bool:
    return any(str(item.path) == str(p) for p, _ in printer_a["tests"])


# --- bad input: one clear error naming the value and what is valid ---------------------------


def test_roi_errors_name_the_value():
    from inspect3d.normal.roi import parse_roi

    with pytest.raises(InspectError, match=r"normal.roi=\[0, 0, 900, 100\] lies outside .*512x256"):
        parse_roi([0, 0, 900, 100], 512, 256)
    with pytest.raises(InspectError, match=r"polygon of 2 point\(s\): it needs at least 3"):
        parse_roi([[0, 0], [10, 10]], 512, 256)
    with pytest.raises(InspectError, match=r"not a rectangle"):
        parse_roi([0.5, 0.5, 0.2, 0.9], 512, 256)
    with pytest.raises(InspectError, match=r"normal.roi='plate' is not valid"):
        parse_roi("plate", 512, 256)
    assert parse_roi([0.1, 0.2, 0.9, 0.8], 512, 256)[2] == [0.9, 0.8]
    assert parse_roi([[0, 0], [256, 0], [256, 128]], 512, 256)[2] == [0.5, 0.5]


def test_fit_refuses_too_few_layers_and_mis_sized_part_masks(printer_a, tmp_path):
    from inspect3d.normal.fit import fit_normal

    few = tmp_path / "few"
    (few / "ok").mkdir(parents=True)
    for p in sorted((printer_a["fit"] / "ok").iterdir())[:4]:
        os.symlink(p.resolve(), few / "ok" / p.name)
    cfg = compose("fit_normal", ["data=folder", f"data.root={few}", "data.normal_class=ok"])
    with pytest.raises(InspectError, match=r"only 4 good layer\(s\).*at least 5"):
        isolated(fit_normal, cfg, tmp_path / "run")
    bad = tmp_path / "bad"
    (bad / "ok").mkdir(parents=True)
    (bad / "_parts").mkdir()
    for p in sorted((printer_a["fit"] / "ok").iterdir())[:6]:
        os.symlink(p.resolve(), bad / "ok" / p.name)
        cv2.imwrite(str(bad / "_parts" / p.name), np.zeros((100, 100), np.uint8))
    cfg = compose(
        "fit_normal",
        [
            "data=folder",
            f"data.root={bad}",
            "data.normal_class=ok",
            "normal.bank_size=64",
            "normal.use_parts=true",
        ],  # fmt: skip
    )
    with pytest.raises(InspectError, match=r"part mask .* is 100x100 but its layer .* 256x256"):
        isolated(fit_normal, cfg, tmp_path / "run2")
