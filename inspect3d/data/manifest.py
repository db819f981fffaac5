"""Layer data sets as lists of items: from a folder per class, or from a manifest CSV.

Manifest CSV columns: ``path,label,job,layer,printer`` (``mask`` optional); paths are relative to
the CSV's folder (or absolute). ``job``/``layer``/``printer``/``mask`` may be empty.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from inspect3d.data.layout import is_image, list_images, natural_key, parse_layer_name
from inspect3d.errors import InspectError
from inspect3d.io import write_text_atomic

MANIFEST_COLUMNS = ("path", "label", "job", "layer", "printer", "mask")
REQUIRED_COLUMNS = ("path", "label")
MASK_DIR = "_masks"


@dataclass(frozen=True)
class Item:
    path: Path
    label: str
    job: str | None = None
    layer: int | None = None
    printer: str | None = None
    mask: Path | None = None


def scan_folder(root: str | Path) -> list[Item]:
    """Folder-per-class data set: ``root/<class>/<image>``.

    Sub-folders whose names start with ``_`` or ``.`` are not classes. Optional per-pixel defect
    masks (white = defect) lie in ``root/_masks/`` under the layer's file name.
    """
    root = _existing_dir(root, "data root")
    class_dirs = sorted(
        (d for d in root.iterdir() if d.is_dir() and d.name[0] not in "_."),
        key=lambda d: natural_key(d.name),
    )
    if not class_dirs:
        raise InspectError(
            f"no class folders in {str(root)!r}: expected one sub-folder per class, "
            "e.g. ROOT/OK/*.png and ROOT/streak/*.png"
        )
    items: list[Item] = []
    for d in class_dirs:
        images = list_images(d)
        if not images:
            raise InspectError(
                f"class folder {str(d)!r} holds no images (looked for image files directly "
                "inside it); add images or remove the folder"
            )
        items += [_item_from_name(p, d.name, root / MASK_DIR) for p in images]
    return items


def _item_from_name(path: Path, label: str, mask_dir: Path) -> Item:
    name = parse_layer_name(path)
    mask = mask_dir / path.name
    return Item(path=path, label=label, job=name.job, layer=name.layer,
                mask=mask if mask.is_file() else None)


def read_manifest(csv_path: str | Path) -> list[Item]:
    """Read a manifest CSV; every listed image must exist."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InspectError(f"manifest not found: {str(csv_path)!r} (a CSV with columns path,label,...)")
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InspectError(
                f"manifest {str(csv_path)!r} lacks column(s) {missing}; it has "
                f"{reader.fieldnames}, expected {list(MANIFEST_COLUMNS)}"
            )
        items = [_item_from_row(row, csv_path.parent, i + 2) for i, row in enumerate(reader)]
    if not items:
        raise InspectError(f"manifest {str(csv_path)!r} lists no images")
    _check_exist(items, csv_path)
    return items


def _item_from_row(row: dict, base: Path, line: int) -> Item:
    def opt(key: str) -> str | None:
        value = (row.get(key) or "").strip()
        return value or None

    if not opt("path") or not opt("label"):
        raise InspectError(f"manifest line {line}: 'path' and 'label' must not be empty ({row})")
    layer = opt("layer")
    if layer is not None and not layer.lstrip("-").isdigit():
        raise InspectError(f"manifest line {line}: layer {layer!r} is not an integer")
    mask = opt("mask")
    return Item(
        path=base / opt("path"),
        label=opt("label"),
        job=opt("job"),
        layer=int(layer) if layer is not None else None,
        printer=opt("printer"),
        mask=base / mask if mask else None,
    )


def _check_exist(items: list[Item], source: Path) -> None:
    missing = [str(it.path) for it in items if not is_image(it.path)]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise InspectError(
            f"{len(missing)} image(s) listed in {str(source)!r} are missing or not images: "
            f"{missing[:3]}{more}"
        )


def write_manifest(items: list[Item], csv_path: str | Path) -> Path:
    """Write items as a manifest CSV (paths relative to its folder when below it)."""
    csv_path = Path(csv_path)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for it in items:
        writer.writerow(
            [
                _rel(it.path, csv_path.parent),
                it.label,
                it.job or "",
                "" if it.layer is None else it.layer,
                it.printer or "",
                _rel(it.mask, csv_path.parent) if it.mask else "",
            ]
        )
    return write_text_atomic(csv_path, buf.getvalue())


def _rel(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(path)


def class_list(items: list[Item], normal_class: str) -> list[str]:
    """Classes with the normal class first, the rest in natural order."""
    counts = Counter(it.label for it in items)
    if normal_class not in counts:
        raise InspectError(
            f"normal_class {normal_class!r} is not among the classes found: {sorted(counts)}; "
            "set data.normal_class to one of them"
        )
    return [normal_class] + sorted((c for c in counts if c != normal_class), key=natural_key)


def _existing_dir(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise InspectError(f"{what} {str(path)!r} does not exist")
    if not path.is_dir():
        raise InspectError(f"{what} {str(path)!r} is not a folder")
    return path
