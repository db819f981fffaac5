"""Layer naming, folder and manifest data sets, and their errors."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from inspect3d.data.layout import LayerName, layer_file_name, parse_layer_name
from inspect3d.data.manifest import (
    Item,
    class_list,
    read_manifest,
    scan_folder,
    write_manifest,
)
from inspect3d.errors import InspectError


def make_folder(root, classes: dict[str, int]):
    for label, n in classes.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            cv2.imwrite(str(root / label / f"img {i:03d}.png"), np.zeros((8, 8), np.uint8))
    return root


def test_layer_names():
    assert parse_layer_name("a/job007__0012.png") == LayerName("job007", 12)
    name = parse_layer_name("Powder Uneven_With_Scratch/converted_ 0033.jpg")
    assert (name.job, name.layer) == (None, 33)
    assert parse_layer_name("PowderRecoat_20210909_143308.jpg").layer == 143308
    assert parse_layer_name("layer.png").layer is None
    assert parse_layer_name(layer_file_name("j1", 5)) == LayerName("j1", 5)
    with pytest.raises(ValueError, match="may not contain"):
        layer_file_name("a__b", 1)


def test_scan_folder_reads_classes_and_skips_underscore_folders(tmp_path):
    root = make_folder(tmp_path, {"OK": 3, "streak": 2, "_masks": 4})
    items = scan_folder(root)
    assert sorted({it.label for it in items}) == ["OK", "streak"]
    assert [it.layer for it in items if it.label == "OK"] == [0, 1, 2]
    assert class_list(items, "OK") == ["OK", "streak"]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "no class folders"),
        (lambda root: (root / "OK").mkdir(parents=True), "holds no images"),
    ],
)
def test_bad_folders_are_explained(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(InspectError, match=message):
        scan_folder(root)


def test_missing_normal_class_lists_the_classes(tmp_path):
    items = scan_folder(make_folder(tmp_path, {"good": 1, "bad": 1}))
    with pytest.raises(InspectError, match=r"normal_class 'OK'.*\['bad', 'good'\]"):
        class_list(items, "OK")


def test_manifest_round_trip_and_errors(tmp_path):
    root = make_folder(tmp_path / "d", {"OK": 2, "streak": 1})
    items = [
        Item(p.path, p.label, "job 1", i, "printer-a") for i, p in enumerate(scan_folder(root))
    ]
    csv_path = write_manifest(items, root / "manifest.csv")
    back = read_manifest(csv_path)
    assert [(b.path.resolve(), b.label, b.job, b.layer, b.printer) for b in back] == [
        (i.path.resolve(), i.label, i.job, i.layer, i.printer) for i in items
    ]

    (tmp_path / "nolabel.csv").write_text("path,job\na.png,1\n")
    with pytest.raises(InspectError, match=r"lacks column\(s\) \['label'\]"):
        read_manifest(tmp_path / "nolabel.csv")
    (tmp_path / "gone.csv").write_text("path,label\nnot-there.png,OK\n")
    with pytest.raises(InspectError, match="not-there.png"):
        read_manifest(tmp_path / "gone.csv")
    (tmp_path / "badlayer.csv").write_text(f"path,label,layer\n{items[0].path},OK,ten\n")
    with pytest.raises(InspectError, match="layer 'ten'"):
        read_manifest(tmp_path / "badlayer.csv")
