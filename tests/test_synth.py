"""The synthetic powder-bed generator: layout, determinism, defect onset, no trivial cue, the
machine frame outside the plate, part masks, thin streaks."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from inspect3d.data import synth
from inspect3d.data.manifest import read_manifest, scan_folder
from inspect3d.data.synth import (
    CLASSES,
    NORMAL_CLASS,
    SynthConfig,
    generate,
    plate_rect,
    render_job,
    render_layers,
)
from inspect3d.errors import InspectError

# >= 100 layers with every defect type twice; small layers keep the file fast
SET_CFG = SynthConfig(seed=3, n_jobs=12, layers_per_job=10, size=128)
TINY_CFG = SynthConfig(seed=1, n_jobs=5, layers_per_job=4, size=96, defect_fraction=0.8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    out = tmp_path_factory.mktemp("synth") / "set"
    return out, generate(out, SET_CFG, progress=False)


def read_grey(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None and image.dtype == np.uint8 and image.ndim == 2, path
    return image


def by_job(items: list) -> dict[str, list]:
    jobs = defaultdict(list)
    for it in items:
        jobs[it.job].append(it)
    return {job: sorted(layers, key=lambda it: it.layer) for job, layers in jobs.items()}


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Rank-based AUROC (Mann-Whitney U), ties counted half."""
    scores = np.concatenate([positive, negative])
    order = scores.argsort(kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks of ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_auroc_helper() -> None:
    assert auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auroc(np.array([1.0]), np.array([2.0])) == 0.0
    assert auroc(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.5


def test_layout_and_manifest(dataset: tuple[Path, list]) -> None:
    out, items = dataset
    assert len(items) == SET_CFG.n_jobs * SET_CFG.layers_per_job
    manifest = read_manifest(out / "manifest.csv")
    key = lambda it: (it.label, it.job, it.layer, it.printer, it.path.name)  # noqa: E731
    assert sorted(map(key, manifest)) == sorted(map(key, items))
    assert {it.label for it in manifest} == set(CLASSES)
    assert {it.printer for it in manifest} == {"synth-a", "synth-b"}
    for it in manifest:
        assert it.path == out / it.label / f"{it.job}__{it.layer:04d}.png"
        assert it.mask == out / "_masks" / it.path.name
        image, mask = read_grey(it.path), read_grey(it.mask)
        assert image.shape == mask.shape == (SET_CFG.size, SET_CFG.size)
        assert set(np.unique(mask)) <= {0, 255}
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*.png")}
    listed = {it.path.relative_to(out).as_posix() for it in manifest}
    listed |= {it.mask.relative_to(out).as_posix() for it in manifest}
    listed |= {f"_parts/{it.path.name}" for it in manifest}
    assert on_disk == listed
    assert json.loads((out / "printers.json").read_text()).keys() == {"synth-a", "synth-b"}
    folder = {(it.label, it.job, it.layer) for it in scan_folder(out)}
    assert folder == {(it.label, it.job, it.layer) for it in manifest}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folders


def test_onset_and_persistence(dataset: tuple[Path, list]) -> None:
    _, items = dataset
    defective = 0
    for job, layers in by_job(items).items():
        assert [it.layer for it in layers] == list(range(SET_CFG.layers_per_job))
        labels = [it.label for it in layers]
        kinds = set(labels) - {NORMAL_CLASS}
        assert len(kinds) <= 1, (job, labels)
        if not kinds:
            assert not any(read_grey(it.mask).any() for it in layers), job
            continue
        defective += 1
        onset = labels.index(kinds.pop())
        assert onset >= 1, f"{job}: a defect may not start at the first layer"
        assert labels[onset:] == [labels[onset]] * (len(labels) - onset), job
        assert not any(read_grey(it.mask).any() for it in layers[:onset]), job
        assert all(read_grey(it.mask).any() for it in layers[onset:]), job
    assert defective == round(SET_CFG.defect_fraction * SET_CFG.n_jobs)


def test_no_trivial_global_cue(dataset: tuple[Path, list]) -> None:
    _, items = dataset
    images = [read_grey(it.path).astype(np.float64) for it in items]
    is_defect = np.array([it.label != NORMAL_CLASS for it in items])
    assert is_defect.sum() >= 30 and (~is_defect).sum() >= 30
    for name, stat in (("mean", np.mean), ("std", np.std)):
        values = np.array([stat(im) for im in images])
        score = auroc(values[is_defect], values[~is_defect])
        assert 0.3 <= score <= 0.7, f"global {name} separates defect from ok: AUROC {score:.3f}"


def streak_widths(mask: np.ndarray) -> tuple[list[int], list[int]]:
    """Widths of the long lines in a streak mask: (vertical runs of columns, horizontal runs of
    rows), each line covering >= 30 % of the layer; fails if any mask pixel lies off them."""
    size = mask.shape[0]
    long_cols, long_rows = mask.sum(axis=0) >= 0.3 * size, mask.sum(axis=1) >= 0.3 * size
    assert not (mask & ~long_cols[None, :] & ~long_rows[:, None]).any(), "not a straight line"
    return run_lengths(long_cols), run_lengths(long_rows)


def run_lengths(flags: np.ndarray) -> list[int]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flags.astype(np.int8), [0]])))
    return (edges[1::2] - edges[::2]).tolist()


def test_streaks_are_thin_and_long(dataset: tuple[Path, list]) -> None:
    _, items = dataset
    streak_layers = [it for it in items if it.label == "streak"]
    assert streak_layers
    for it in streak_layers:
        widths = sum(streak_widths(read_grey(it.mask) > 0), [])
        assert len(widths) >= 1 and all(1 <= w <= 3 for w in widths), (it.path.name, widths)


@pytest.mark.parametrize("size", [128, 512])
def test_streaks_are_1_to_3_px_wide_along_and_across(size: int) -> None:
    cfg = SynthConfig(seed=5, n_jobs=30, layers_per_job=2, size=size, defect_fraction=1.0)
    jobs = [j for j, d in enumerate(synth._job_defects(cfg)) if d == "streak"]
    along, across = [], []
    for j in jobs:
        vertical, horizontal = streak_widths(render_layers(cfg, j)[-1].mask > 0)
        along, across = along + vertical, across + horizontal
    widths = along + across
    assert along and across, "streaks both along and across the recoating direction"
    assert set(widths) <= {1, 2, 3} and len(set(widths)) >= 2, widths  # 1-3 px, not one width


def test_render_job_is_deterministic_and_seeded() -> None:
    a, b = render_job(TINY_CFG, 2), render_job(TINY_CFG, 2)
    for (image_a, mask_a, label_a), (image_b, mask_b, label_b) in zip(a, b, strict=True):
        assert np.array_equal(image_a, image_b) and np.array_equal(mask_a, mask_b)
        assert label_a == label_b
    other = render_job(replace(TINY_CFG, seed=2), 2)
    assert not np.array_equal(a[0][0], other[0][0])
    image, mask, label = a[0]
    assert image.dtype == mask.dtype == np.uint8 and image.shape == (96, 96)
    assert label == NORMAL_CLASS  # the first layer is never defective


def test_smallest_layers_keep_defect_masks() -> None:
    cfg = SynthConfig(seed=4, n_jobs=4, layers_per_job=3, size=64, defect_fraction=1.0)
    labels = set()
    for j in range(cfg.n_jobs):
        for image, mask, label in render_job(cfg, j):
            assert image.shape == mask.shape == (64, 64)
            assert (label != NORMAL_CLASS) == bool(mask.any()), (j, label)
            labels.add(label)
    assert labels == set(CLASSES)


def test_generate_is_byte_identical(tmp_path: Path) -> None:
    def files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.*")}

    generate(tmp_path / "a", TINY_CFG, progress=False)
    generate(tmp_path / "b", TINY_CFG, progress=False)
    generate(tmp_path / "c", replace(TINY_CFG, seed=7), progress=False)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b
    assert "printers.json" in a and any(name.startswith("_parts/") for name in a)
    assert a.keys() & c.keys() and a != c


def test_default_assignment_covers_every_class() -> None:
    defects = synth._job_defects(SynthConfig())
    assert set(defects) == set(CLASSES[1:]) | {None}
    assert sum(d is not None for d in defects) == round(0.7 * 16)


def test_refuses_non_empty_out(tmp_path: Path) -> None:
    out = tmp_path / "set"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InspectError, match="overwrite") as err:
        generate(out, TINY_CFG, progress=False)
    assert str(out) in str(err.value)
    assert (out / "keep.txt").read_text() == "mine"
    items = generate(out, replace(TINY_CFG, overwrite=True), progress=False)
    assert not (out / "keep.txt").exists() and all(it.path.is_file() for it in items)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_jobs", 0),
        ("layers_per_job", 1),
        ("size", 32),
        ("defect_fraction", 1.5),
        ("printers", 0),
        ("min_parts", 0),
        ("max_parts", 1),  # below min_parts
        ("max_parts", 13),
        ("frame", "yes"),
        ("parts", 1),
    ],
)
def test_rejects_bad_config(tmp_path: Path, field: str, value: object) -> None:
    cfg = replace(TINY_CFG, **{field: value})
    with pytest.raises(InspectError, match=f"{field}={value!r}"):
        generate(tmp_path / "set", cfg, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_failed_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing(cfg: SynthConfig, job_index: int) -> list:
        calls.append(job_index)
        if len(calls) > 1:
            raise RuntimeError("interrupted")
        return render_layers(cfg, job_index)

    monkeypatch.setattr(synth, "render_layers", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        generate(tmp_path / "set", TINY_CFG, progress=False)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# machine frame, plate rectangle, parts


def plate_of(out: Path, printer: str) -> tuple[int, int, int, int]:
    px = json.loads((out / "printers.json").read_text())[printer]["plate_px"]
    return px["x0"], px["y0"], px["x1"], px["y1"]


def test_printers_json_names_each_plate(dataset: tuple[Path, list]) -> None:
    out, _ = dataset
    info = json.loads((out / "printers.json").read_text())
    size = SET_CFG.size
    for index, (name, printer) in enumerate(sorted(info.items())):
        x0, y0, x1, y1 = plate_of(out, name)
        assert (x0, y0, x1, y1) == plate_rect(SET_CFG, index)
        assert printer["size"] == size and printer["frame"] is True
        assert printer["plate_frac"] == pytest.approx(
            {"x0": x0 / size, "y0": y0 / size, "x1": x1 / size, "y1": y1 / size}, abs=1e-6
        )
        for margin in (x0, y0, size - x1, size - y1):  # the frame: 5-12 % on every side
            assert 0.05 * size <= margin <= 0.12 * size, (name, margin)
    assert plate_of(out, "synth-a") != plate_of(out, "synth-b")  # printers differ a little


def test_frame_lies_outside_the_plate(dataset: tuple[Path, list]) -> None:
    """Two layers of two jobs on one printer agree (up to exposure and camera noise) exactly
    outside the printers.json plate and disagree from its first pixel in."""
    out, items = dataset
    size = SET_CFG.size
    yy, xx = np.mgrid[:size, :size]
    for printer in ("synth-a", "synth-b"):
        x0, y0, x1, y1 = plate_of(out, printer)
        jobs = by_job([it for it in items if it.printer == printer])
        first, second = list(jobs.values())[:2]
        a, b = read_grey(first[1].path).astype(float), read_grey(second[-1].path).astype(float)
        outside = (xx < x0) | (xx >= x1) | (yy < y0) | (yy >= y1)
        usable = (a > 0) & (a < 255) & (b > 0) & (b < 255)  # not clipped by the exposure
        fit = outside & usable
        gain, offset = np.polyfit(a[fit], b[fit], 1)
        residual = np.abs(b - (gain * a + offset))
        # signed distance to the plate's edge: 1, 2, 3 outside; 0, -1, -2 its outer pixels
        dist = np.maximum.reduce([x0 - xx, xx - (x1 - 1), y0 - yy, yy - (y1 - 1)])
        ring = {d: float(np.median(residual[(dist == d) & usable])) for d in range(-2, 4)}
        frame_worst = max(ring[d] for d in (1, 2, 3))
        plate_best = min(ring[d] for d in (0, -1, -2))
        assert frame_worst < 0.6 * plate_best, (printer, ring)


def test_frames_differ_between_printers(dataset: tuple[Path, list]) -> None:
    _, items = dataset
    means = {}
    for printer in ("synth-a", "synth-b"):
        layer = next(it for it in items if it.printer == printer)
        image = read_grey(layer.path).astype(float)
        means[printer] = image[:, :4].mean()  # the left bar of the frame
    assert abs(means["synth-a"] - means["synth-b"]) > 30, means  # dark steel, bright metal


def test_no_frame_means_plate_fills_the_layer(tmp_path: Path) -> None:
    cfg = replace(TINY_CFG, frame=False)
    assert plate_rect(cfg, 0) == (0, 0, 96, 96)
    generate(tmp_path / "set", cfg, progress=False)
    info = json.loads((tmp_path / "set" / "printers.json").read_text())
    assert info["synth-a"]["plate_frac"] == {"x0": 0, "y0": 0, "x1": 1, "y1": 1}


def test_defects_and_parts_lie_inside_the_plate(dataset: tuple[Path, list]) -> None:
    out, items = dataset
    for it in items:
        x0, y0, x1, y1 = plate_of(out, it.printer)
        for mask in (read_grey(it.mask), read_grey(out / "_parts" / it.path.name)):
            inside = mask[y0:y1, x0:x1]
            assert int(inside.astype(bool).sum()) == int(mask.astype(bool).sum()), it.path.name


def test_part_masks_exist_sized_and_non_empty(dataset: tuple[Path, list]) -> None:
    out, items = dataset
    for it in items:
        parts = read_grey(out / "_parts" / it.path.name)
        assert parts.shape == (SET_CFG.size, SET_CFG.size)
        assert set(np.unique(parts)) == {0, 255}, it.path.name
        assert 0.003 < (parts > 0).mean() < 0.4, it.path.name
    assert not any(it.label.startswith("_") for it in scan_folder(out))


def test_parts_are_where_the_image_differs_from_powder() -> None:
    """Parts on and off share every other random number, so the layers differ only where the
    part masks are (and their anti-aliased rim, <= 2 px); fused metal is smoother than powder."""
    cfg = SynthConfig(seed=2, n_jobs=3, layers_per_job=3, size=256, defect_fraction=0.0)
    for j in range(cfg.n_jobs):
        bare = render_layers(replace(cfg, parts=False), j)
        for with_parts, powder in zip(render_layers(cfg, j), bare, strict=True):
            parts = with_parts.parts > 0
            assert parts.any() and not powder.parts.any()
            differs = with_parts.image != powder.image
            near = cv2.dilate(parts.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
            assert not (differs & ~near).any(), f"job {j}: image changed off the parts"
            assert differs[parts].mean() > 0.8, f"job {j}: parts look like powder"
            # away from the melted contour, the same pixels are smoother fused than as powder
            inner = cv2.erode(parts.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
            assert detail(with_parts.image, inner) < 0.7 * detail(powder.image, inner), j


def detail(image: np.ndarray, where: np.ndarray) -> float:
    """Median fine texture (difference to the 3x3 mean) at the pixels ``where``."""
    image = image.astype(np.float32)
    return float(np.median(np.abs(image - cv2.blur(image, (3, 3)))[where]))


def test_jobs_of_one_printer_get_other_parts(dataset: tuple[Path, list]) -> None:
    out, items = dataset
    jobs = by_job([it for it in items if it.printer == "synth-a"])
    masks = [read_grey(out / "_parts" / layers[0].path.name) > 0 for layers in jobs.values()]
    assert len(masks) >= 3
    for i in range(len(masks)):
        for k in range(i + 1, len(masks)):
            iou = (masks[i] & masks[k]).sum() / (masks[i] | masks[k]).sum()
            assert iou < 0.5, (i, k, iou)


def test_parts_keep_their_place_through_a_job(dataset: tuple[Path, list]) -> None:
    out, items = dataset
    for layers in by_job(items).values():
        masks = [read_grey(out / "_parts" / it.path.name) > 0 for it in layers]
        for before, after in zip(masks, masks[1:], strict=False):
            assert (before & after).sum() / (before | after).sum() > 0.6  # grows or shrinks slowly


def test_number_of_parts_is_configurable() -> None:
    for n in (1, 3, 5):
        cfg = SynthConfig(seed=6, n_jobs=3, layers_per_job=2, size=256, min_parts=n, max_parts=n)
        for j in range(cfg.n_jobs):
            parts = render_layers(cfg, j)[0].parts
            count, _ = cv2.connectedComponents(parts, connectivity=8)
            assert count - 1 == n, (n, j)  # label 0 is the powder


def test_without_parts_no_part_masks_are_written(tmp_path: Path) -> None:
    generate(tmp_path / "set", replace(TINY_CFG, parts=False), progress=False)
    assert not (tmp_path / "set" / "_parts").exists()
