"""From a data config (``configs/data/*.yaml``) to items, preprocessing and a leak-free split."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inspect3d.data.manifest import Item, class_list, read_manifest, scan_folder
from inspect3d.data.preprocess import Preprocess, detect_channels
from inspect3d.data.splits import kfold_split, sequences
from inspect3d.errors import InspectError

log = logging.getLogger(__name__)
DATA_KINDS = ("folder", "manifest", "synth")


@dataclass
class LayerData:
    items: list[Item]
    classes: list[str]
    normal_class: str
    train: list[int]
    val: list[int]
    groups: list[str]

    def labels(self) -> list[int]:
        index = {c: i for i, c in enumerate(self.classes)}
        return [index[it.label] for it in self.items]


def preprocess_of(data: Any, items: list[Item] | None = None) -> Preprocess:
    """The preprocessing ``data`` asks for; without ``data.channels``, grey or colour as the
    layers are (``items``, else the data set's), and the choice is logged."""
    return Preprocess(
        height=data.height,
        width=data.width,
        channels=data.channels or channels_of(data, items),
        norm=data.norm,
        mean=data.mean,
        std=data.std,
    )


def channels_of(data: Any, items: list[Item] | None) -> int:
    """1 or 3, detected from the layers: colour when most sampled images' channels differ."""
    items = load_items(data) if items is None else items
    channels, colour, n = detect_channels([it.path for it in items])
    log.info(
        "data.channels not set: %d of %d sampled layers are colour, so the model sees %s "
        "(data.channels=%d; set data.channels to choose)",
        colour,
        n,
        "colour" if channels == 3 else "grey",
        channels,
    )
    return channels


def load_items(data: Any, root: str | None = None) -> list[Item]:
    """Items of the data set described by ``data`` (root overridable, e.g. for val_root)."""
    if data.kind == "manifest":
        return read_manifest(manifest_path(data, root))
    root = Path(root or data.root).expanduser()
    if data.kind == "folder":
        return scan_folder(root)
    if data.kind == "synth":
        return _synth_items(data, root)
    raise InspectError(f"data.kind={data.kind!r} is not valid: use one of {DATA_KINDS}")


def manifest_path(data: Any, root: str | None = None) -> Path:
    """The CSV of ``data=manifest``: ``data.manifest``, else ``ROOT/manifest.csv``.

    ``root`` (e.g. ``data.val_root``) may name a CSV or a folder holding ``manifest.csv``.
    """
    if root:
        path = Path(root).expanduser()
        return path if path.suffix.lower() == ".csv" else path / "manifest.csv"
    if data.manifest:
        return Path(data.manifest).expanduser()
    if data.root:
        return Path(data.root).expanduser() / "manifest.csv"
    raise InspectError(
        "data=manifest needs data.manifest=FILE.csv (or data.root=DIR holding manifest.csv)"
    )


def _synth_items(data: Any, root: Path) -> list[Item]:
    if not (root / "manifest.csv").is_file():
        from inspect3d.data.synth import SynthConfig, generate

        log.info("generating synthetic layers into %s", root)
        generate(root, SynthConfig(**dict(data.synth)))
    return read_manifest(root / "manifest.csv")


def load_data(data: Any, seed: int = 0) -> LayerData:
    """Items, classes (normal first) and the train/val split the config asks for."""
    items = load_items(data)
    if data.val_root:
        val_items = load_items(data, data.val_root)
        classes = class_list(items + val_items, data.normal_class)
        all_items = items + val_items
        train, val = list(range(len(items))), list(range(len(items), len(all_items)))
        groups = [f"item{i}" for i in range(len(all_items))]
        return LayerData(all_items, classes, data.normal_class, train, val, groups)
    classes = class_list(items, data.normal_class)
    split = kfold_split(items, data.fold, data.folds, data.block_size, data.purge_gap, seed)
    train = subsample(items, split.train, data.subsample)
    return LayerData(items, classes, data.normal_class, train, split.val, split.groups)


def subsample(items: list[Item], indices: list[int], every: int) -> list[int]:
    """Keep every ``every``-th layer of each sequence (consecutive layers are near-duplicates)."""
    if every < 1:
        raise InspectError(f"data.subsample={every!r} is not valid: use 1 (all layers) or more")
    if every == 1:
        return indices
    chosen = set(indices)
    kept = []
    for idx in sequences([items[i] for i in indices]).values():
        kept += [indices[j] for j in idx[::every]]
    return sorted(i for i in kept if i in chosen)
