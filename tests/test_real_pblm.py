"""A small slice of the real PBLM powder-bed set (../shared/datasets/pblm), end to end.

Skipped, with the reason, only where ../shared is absent.
"""

from __future__ import annotations

import pytest

from inspect3d.data.manifest import Item, scan_folder, write_manifest
from inspect3d.data.preprocess import Preprocess

from conftest import compose, pblm_or_skip
from isolate import isolated

pytestmark = pytest.mark.real_data
CLASSES = ("No_Defect", "Powder_Uneven", "Powder Uneven_With_Scratch")


@pytest.fixture(scope="module")
def pblm_slice(tmp_path_factory):
    """A manifest over 10 layers of each of three classes, read in place (paths with spaces)."""
    items = scan_folder(pblm_or_skip())
    picked: list[Item] = []
    for label in CLASSES:
        picked += [it for it in items if it.label == label][:10]
    csv_path = tmp_path_factory.mktemp("pblm") / "manifest.csv"
    write_manifest(picked, csv_path)
    return csv_path


def test_pblm_reads_with_spaces_and_both_cameras():
    pblm = pblm_or_skip()
    pre = Preprocess(height=256, width=256)
    spaced = next((pblm / "Powder Uneven_With_Scratch").glob("converted_ *.jpg"))
    big = next((pblm / "Plateform_Powder_Uneven").glob("*.jpg"))  # 3772x3302 camera
    assert pre.load(spaced).shape == pre.load(big).shape == (1, 256, 256)


def test_pblm_slice_trains_exports_and_scores(pblm_slice, tmp_path):
    from inspect3d.export.onnx import export_run
    from inspect3d.infer import OnnxModel
    from inspect3d.train.run import train

    cfg = compose(
        "train",
        [
            "data=manifest",
            f"data.root={pblm_slice.parent}",
            "data.normal_class=No_Defect",
            "data.height=128",
            "data.width=128",
            "data.folds=2",
            "data.block_size=5",
            "trainer=fast",
            "model.width=8",
        ],
    )
    metrics, _ = isolated(train, cfg, tmp_path)
    assert metrics["n"] > 0 and set(metrics["per_class"]) == set(CLASSES)
    isolated(export_run, compose("export", [f"run={tmp_path}", "n_check=4"]))
    model = OnnxModel.load(tmp_path / "model.onnx")
    layer = next((pblm_or_skip() / "Powder Uneven_With_Scratch").glob("converted_ *.jpg"))
    score = model.predict(layer)
    assert score.path == str(layer) and set(score.probs) == set(CLASSES)
