"""Leak-free splits: whole jobs, or contiguous blocks of layers when jobs are unknown.

Consecutive layers of a build look nearly alike, so a random per-image split leaks. Every item
gets a *group* (its job, or a block of consecutive layers of one class folder); whole groups
are dealt to folds, stratified by each group's majority label. Around each held-out block,
``purge_gap`` neighbouring layers are dropped from training as well.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from inspect3d.data.layout import natural_key
from inspect3d.data.manifest import Item
from inspect3d.errors import InspectError


@dataclass(frozen=True)
class Split:
    train: list[int]
    val: list[int]
    groups: list[str]


def sequences(items: list[Item]) -> dict[str, list[int]]:
    """Items grouped into ordered layer sequences: by job if known, else by class folder."""
    seqs: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        key = f"job:{it.printer or ''}/{it.job}" if it.job else f"class:{it.label}"
        seqs[key].append(i)
    for idx in seqs.values():
        idx.sort(key=lambda i: _order_key(items[i]))
    return dict(seqs)


def _order_key(it: Item) -> tuple:
    return (it.layer if it.layer is not None else -1, natural_key(it.path.name))


def assign_groups(items: list[Item], folds: int, block_size: int) -> list[str]:
    """Group name per item: its job, or a contiguous block of its class folder's layers.

    Unknown-job sequences are cut into at least ``folds`` blocks so every fold can hold one.
    """
    groups = [""] * len(items)
    for key, idx in sequences(items).items():
        if key.startswith("job:"):
            for i in idx:
                groups[i] = key
            continue
        n_blocks = max(folds, -(-len(idx) // block_size))
        for b, chunk in enumerate(np.array_split(np.array(idx), min(n_blocks, len(idx)))):
            for i in chunk:
                groups[int(i)] = f"{key}/block{b:03d}"
    return groups


def merge_duplicates(items: list[Item], groups: list[str]) -> list[str]:
    """Put byte-identical layer files in one group, so a file's twin never sits on the other side.

    Cameras re-trigger and data sets get copied: PBLM's No_Defect folder holds two exact pairs
    in different blocks. Files that cannot be read are left as they are (the loader reports them).
    """
    sizes = [_size(it.path) for it in items]
    shared = {n for n, k in Counter(sizes).items() if n is not None and k > 1}
    first: dict[str, str] = {}
    rename: dict[str, str] = {}
    for it, g, size in zip(items, groups, sizes, strict=True):
        if size not in shared:  # a file of unique size has no twin: no need to read it
            continue
        digest = _digest(it.path)
        if digest is None:
            continue
        root = _resolve(rename, first.setdefault(digest, g))
        if (mine := _resolve(rename, g)) != root:
            rename[mine] = root
    return [_resolve(rename, g) for g in groups]


def _digest(path) -> str | None:
    try:
        return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    except OSError:  # unreadable: the loader reports it
        return None


def _size(path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _resolve(rename: dict[str, str], g: str) -> str:
    while g in rename:
        g = rename[g]
    return g


def assign_folds(items: list[Item], groups: list[str], folds: int, seed: int) -> list[int]:
    """Fold number per item; groups never straddle folds; labels spread evenly over folds."""
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    by_label: dict[str, list[str]] = defaultdict(list)
    for g, idx in members.items():
        by_label[Counter(items[i].label for i in idx).most_common(1)[0][0]].append(g)
    rng = np.random.default_rng(seed)
    fold_of = [0] * len(items)
    total = np.zeros(folds)
    for label in sorted(by_label, key=natural_key):
        names = sorted(by_label[label], key=natural_key)
        per_label = np.zeros(folds)
        for g in (names[k] for k in rng.permutation(len(names))):
            # fewest of this label first, then fewest overall, ties broken at random
            f = int(np.lexsort((rng.random(folds), total, per_label))[0])
            per_label[f] += len(members[g])
            total[f] += len(members[g])
            for i in members[g]:
                fold_of[i] = f
    return fold_of


def kfold_split(
    items: list[Item],
    fold: int,
    folds: int = 5,
    block_size: int = 16,
    purge_gap: int = 2,
    seed: int = 0,
) -> Split:
    """Train/val indices for one fold of a grouped, blocked k-fold split."""
    if folds < 2:
        raise InspectError(f"folds={folds!r} is not valid: use 2 or more")
    if not 0 <= fold < folds:
        raise InspectError(f"fold={fold!r} is not valid: use 0..{folds - 1}")
    groups = merge_duplicates(items, assign_groups(items, folds, block_size))
    fold_of = assign_folds(items, groups, folds, seed)
    val = [i for i, f in enumerate(fold_of) if f == fold]
    if not val or len(val) == len(items):
        raise InspectError(
            f"fold {fold} of {folds} leaves an empty side: the data has only "
            f"{len(set(groups))} jobs/blocks; use fewer data.folds or more jobs"
        )
    purged = _purged_neighbours(items, set(val), purge_gap)
    train = [i for i, f in enumerate(fold_of) if f != fold and i not in purged]
    return Split(train=train, val=val, groups=groups)


def _purged_neighbours(items: list[Item], val: set[int], gap: int) -> set[int]:
    """Training items within ``gap`` positions of a held-out item in the same layer sequence."""
    purged: set[int] = set()
    if gap <= 0:
        return purged
    for idx in sequences(items).values():
        for pos, i in enumerate(idx):
            if i in val:
                purged.update(j for j in idx[max(0, pos - gap) : pos + gap + 1] if j not in val)
    return purged
