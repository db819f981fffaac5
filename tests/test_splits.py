"""Leak-free splits: no job and no block of neighbouring layers on both sides."""

from __future__ import annotations

from pathlib import Path

import pytest

from inspect3d.data.manifest import Item, scan_folder
from inspect3d.data.splits import kfold_split, sequences
from inspect3d.errors import InspectError

from conftest import pblm_or_skip


def jobs(n_jobs: int, layers: int, onset: int = 3) -> list[Item]:
    """Jobs whose later layers turn defective, like real builds (one job, two labels)."""
    items = []
    for j in range(n_jobs):
        for layer in range(layers):
            label = "ok" if j % 3 == 0 or layer < onset else ("streak", "spatter")[j % 2]
            items.append(Item(Path(f"{label}/job{j}__{layer:04d}.png"), label, f"job{j}", layer))
    return items


def unknown_jobs(counts: dict[str, int]) -> list[Item]:
    return [
        Item(Path(f"{label}/converted_ {i:04d}.jpg"), label, None, i)
        for label, n in counts.items()
        for i in range(n)
    ]


@pytest.mark.parametrize("fold", range(5))
def test_no_job_on_both_sides(fold):
    items = jobs(n_jobs=15, layers=8)
    split = kfold_split(items, fold, folds=5, seed=1)
    train_jobs = {items[i].job for i in split.train}
    val_jobs = {items[i].job for i in split.val}
    assert train_jobs and val_jobs and not (train_jobs & val_jobs)


def test_every_layer_is_validated_exactly_once_over_the_folds():
    items = jobs(n_jobs=12, layers=5)
    seen = [i for f in range(4) for i in kfold_split(items, f, folds=4).val]
    assert sorted(seen) == list(range(len(items)))


@pytest.mark.parametrize("fold", range(5))
def test_unknown_jobs_use_contiguous_blocks_with_a_purge_gap(fold):
    items = unknown_jobs({"No_Defect": 23, "Powder_Uneven": 200, "Scratch": 150})
    gap = 3
    split = kfold_split(items, fold, folds=5, block_size=20, purge_gap=gap)
    val = set(split.val)
    assert {items[i].label for i in split.val} == {"No_Defect", "Powder_Uneven", "Scratch"}
    for seq in sequences(items).values():
        val_pos = [p for p, i in enumerate(seq) if i in val]
        train_pos = [p for p, i in enumerate(seq) if i in set(split.train)]
        assert min(abs(t - v) for t in train_pos for v in val_pos) > gap


def test_too_few_groups_is_an_error_not_an_empty_split():
    with pytest.raises(InspectError, match="fewer data.folds"):
        kfold_split(jobs(n_jobs=2, layers=3), 3, folds=5)  # 2 jobs cannot fill 5 folds
    with pytest.raises(InspectError, match="fold=7"):
        kfold_split(jobs(n_jobs=9, layers=3), 7, folds=5)


def test_split_is_deterministic_for_a_seed():
    items = jobs(n_jobs=20, layers=4)
    assert kfold_split(items, 1, seed=3).val == kfold_split(items, 1, seed=3).val


@pytest.mark.real_data
def test_pblm_blocked_split_has_no_neighbour_across_sides():
    items = scan_folder(pblm_or_skip())
    for fold in range(5):
        split = kfold_split(items, fold, folds=5, block_size=20, purge_gap=3)
        train = {(items[i].label, items[i].layer) for i in split.train}
        for i in split.val:
            it = items[i]
            near = {(it.label, it.layer + d) for d in range(-3, 4)}
            assert not (near & train), f"{it.path} has a training neighbour"


def test_byte_identical_layers_never_straddle_the_split(tmp_path):
    """A re-triggered camera or a copied file: twins in far-apart blocks stay on one side."""
    items = []
    for label, n in (("ok", 40), ("streak", 40)):
        for i in range(n):
            path = tmp_path / label / f"converted_ {i:04d}.jpg"
            path.parent.mkdir(exist_ok=True)
            twin = i == 35 and label == "ok"  # same bytes as ok layer 0, seven blocks away
            path.write_bytes(b"layer ok 0" if twin else f"layer {label} {i}".encode())
            items.append(Item(path, label, None, i))
    for fold in range(5):
        split = kfold_split(items, fold, folds=5, block_size=5, purge_gap=1)
        sides = {i in split.val for i in (0, 35)}
        assert len(sides) == 1, f"fold {fold}: the twins are on both sides"
        assert split.groups[0] == split.groups[35]


def test_pblm_exact_duplicates_share_a_side():
    root = pblm_or_skip()
    items = scan_folder(root)
    index = {it.path.name: i for i, it in enumerate(items) if it.label == "No_Defect"}
    pairs = [
        ("converted_ 0000.jpg", "converted_ 0013.jpg"),
        ("converted_ 0001.jpg", "converted_ 0014.jpg"),
    ]
    for a, b in pairs:
        assert items[index[a]].path.read_bytes() == items[index[b]].path.read_bytes()
    for fold in range(5):
        split = kfold_split(items, fold, folds=5, block_size=20, purge_gap=3)
        val = set(split.val)
        for a, b in pairs:
            assert (index[a] in val) == (index[b] in val), f"fold {fold}: {a} and {b} split"
