"""The synthetic powder-bed generator: layout, determinism, defect onset, no trivial cue."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from inspect3d.data import synth
from inspect3d.data.manifest import read_manifest, scan_folder
from inspect3d.data.synth import CLASSES, NORMAL_CLASS, SynthConfig, generate, render_job
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
    assert on_disk == listed
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


def test_streaks_are_thin_and_long(dataset: tuple[Path, list]) -> None:
    _, items = dataset
    streak_layers = [it for it in items if it.label == "streak"]
    assert streak_layers
    for it in streak_layers:
        mask = read_grey(it.mask) > 0
        columns = mask.any(axis=0).astype(np.int8)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], columns, [0]])))
        widths = edges[1::2] - edges[::2]
        assert len(widths) >= 1 and all(1 <= w <= 3 for w in widths), (it.path.name, widths)
        assert mask.sum(axis=0).max() >= 0.4 * SET_CFG.size  # spans much of the bed height


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
    [("n_jobs", 0), ("layers_per_job", 1), ("size", 32), ("defect_fraction", 1.5), ("printers", 0)],
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
        return render_job(cfg, job_index)

    monkeypatch.setattr(synth, "render_job", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        generate(tmp_path / "set", TINY_CFG, progress=False)
    assert list(tmp_path.iterdir()) == []
