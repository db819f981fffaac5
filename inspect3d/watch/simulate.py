"""``inspect3d simulate``: replay a data set into an inbox the way printers write layers.

Jobs (from ``DIR/manifest.csv`` of ``inspect3d synth``, or a folder per class whose file names
tell ``<job>__<layer>``) are dealt round-robin to ``printers`` printers; every printer writes
``rate`` layers per second into ``INBOX/<printer>/<job>/``, then a marker file ends the job.
Writing modes: ``rename`` (a hidden temporary name, then an atomic rename), ``grow`` (the file
grows in two halves with a pause: the watcher must wait for it), ``direct``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from inspect3d.data.layout import natural_key
from inspect3d.data.manifest import Item, read_manifest, scan_folder
from inspect3d.errors import InspectError

log = logging.getLogger(__name__)
MODES = ("rename", "grow", "direct")


@dataclass
class SimJob:
    """One job to replay: its layers in order and the first layer that is not normal."""

    name: str
    layers: list[Item]
    first_defect_layer: int | None
    printer: str = ""
    written: int = field(default=0)


def load_jobs(data: str | Path, normal_class: str = "ok") -> list[SimJob]:
    """The jobs of a data set, each with its layers in layer order."""
    data = Path(data)
    items = (
        read_manifest(data / "manifest.csv")
        if (data / "manifest.csv").is_file()
        else scan_folder(data)
    )
    groups: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        groups[it.job or f"{it.label}-{it.path.parent.name}"].append(it)
    jobs = []
    for name in sorted(groups, key=natural_key):
        layers = sorted(groups[name], key=lambda it: (it.layer or 0, natural_key(it.path.name)))
        bad = [_number(i, it) for i, it in enumerate(layers) if it.label != normal_class]
        jobs.append(SimJob(name, layers, bad[0] if bad else None))
    if not jobs:
        raise InspectError(f"no layer images found in {str(data)!r}")
    return jobs


def _number(index: int, item: Item) -> int:
    return item.layer if item.layer is not None else index + 1


def write_layer(src: Path, dest: Path, mode: str, pause_s: float = 0.05) -> None:
    """Copy ``src`` to ``dest`` the way a printer would (see the module doc for ``mode``)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if mode == "rename":
        tmp = dest.with_name(f".{dest.name}.part")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    elif mode == "grow":
        data = src.read_bytes()
        with open(dest, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            time.sleep(pause_s)
            f.write(data[len(data) // 2 :])
    else:
        shutil.copyfile(src, dest)


def simulate(
    data: str | Path,
    inbox: str | Path,
    printers: int = 2,
    rate: float = 1.0,
    mode: str = "rename",
    marker: str = "JOB_END",
    max_jobs: int | None = None,
    normal_class: str = "ok",
) -> list[SimJob]:
    """Replay ``data`` into ``inbox``; ``rate`` layers/s per printer (0: as fast as possible)."""
    if mode not in MODES:
        raise InspectError(f"mode={mode!r} is not valid: use one of {MODES}")
    if printers < 1 or rate < 0:
        raise InspectError(f"printers={printers!r} must be >= 1 and rate={rate!r} >= 0")
    jobs = load_jobs(data, normal_class)[:max_jobs]
    queues: list[list[SimJob]] = [[] for _ in range(printers)]
    for i, job in enumerate(jobs):
        job.printer = f"printer{i % printers + 1:02d}"
        queues[i % printers].append(job)
    inbox = Path(inbox)
    start, tick = time.monotonic(), 0
    while any(queues):
        for queue in queues:
            if queue and _write_next(queue, inbox, mode, marker):
                queue.pop(0)
        tick += 1
        if rate > 0:
            time.sleep(max(0.0, start + tick / rate - time.monotonic()))
    log.info("replayed %d jobs on %d printers into %s", len(jobs), printers, inbox)
    return jobs


def _write_next(queue: list[SimJob], inbox: Path, mode: str, marker: str) -> bool:
    """Write the next layer of the printer's current job; True when the job is complete."""
    job = queue[0]
    folder = inbox / job.printer / job.name
    item = job.layers[job.written]
    write_layer(item.path, folder / item.path.name, mode)
    job.written += 1
    if job.written < len(job.layers):
        return False
    if marker:
        (folder / marker).touch()
    return True
