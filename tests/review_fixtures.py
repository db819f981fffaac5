"""A watcher store filled by replaying synthetic jobs through the real watcher, for QA tests.

The threshold is set at the median score of the replayed layers, so whatever the tiny test model
learned, some jobs are flagged and some layers stay good. The replayed files get the arrival
times (mtimes) a printer would have given them, one layer every ``LAYER_S`` seconds, as a copy
of a printer's own files keeps them. One extra job has a hostile printer and job name (HTML and
quotes) to prove everything shown is escaped; its files keep their copy time (all at once).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from inspect3d.data.layout import natural_key
from inspect3d.infer.model import OnnxModel
from inspect3d.review import shop
from inspect3d.review.server import ReviewServer
from inspect3d.watch.config import WatchConfig
from inspect3d.watch.policy import PolicyConfig
from inspect3d.watch.service import Watcher
from inspect3d.watch.simulate import simulate

HOSTILE_PRINTER = "pr\"<b onmouseover=alert('p')>'"
HOSTILE_JOB = "job<img src=x onerror=alert('job')>"
HOSTILE_NOTE = '</script><script>alert("note")</script> & "quotes" \'single\''
LAYER_S = 30.0  # seconds between two layers of a printer


def pace_layers(inbox: Path, seconds: float = LAYER_S) -> None:
    """Give each printer's layer files one arrival time every ``seconds``, job after job."""
    start = time.time() - 24 * 3600
    for printer in sorted(p for p in inbox.iterdir() if p.is_dir()):
        files = [f for job in sorted(printer.iterdir(), key=lambda p: natural_key(p.name))
                 for f in sorted(job.glob("*.png"), key=lambda p: natural_key(p.name))]  # fmt: skip
        for i, f in enumerate(files):
            os.utime(f, (start + i * seconds, start + i * seconds))


def median_threshold(model: Path, images: list[Path]) -> float:
    scores = [s.defect_score for s in OnnxModel.load(model).predict_batch(images)]
    return float(np.median(scores))


def add_hostile_job(data: Path, inbox: Path, n: int = 4) -> None:
    """Copy layers of one defective job under a printer and job name full of HTML."""
    defect_dirs = [d for d in data.iterdir() if d.is_dir() and d.name != "ok" and d.name[0] != "_"]
    src = sorted(p for d in defect_dirs for p in d.glob("*.png"))[:n]
    folder = inbox / HOSTILE_PRINTER / HOSTILE_JOB
    folder.mkdir(parents=True)
    for i, p in enumerate(src):
        shutil.copyfile(p, folder / f"layer_{i:04d}.png")
    (folder / "JOB_END").touch()


def replay_store(data: Path, model: Path, root: Path) -> Path:
    """Replay ``data`` (from ``inspect3d synth``) as 2 printers; returns the state folder."""
    inbox, state = root / "inbox", root / "state"
    simulate(data, inbox, printers=2, rate=0, mode="direct")
    pace_layers(inbox)
    add_hostile_job(data, inbox)
    threshold = median_threshold(model, sorted(inbox.glob("*/*/*.png")))
    cfg = WatchConfig(
        model=str(model), inbox=str(inbox), state=str(state), settle_s=0.0, poll_s=0.01,
        idle_s=3600.0, policy=PolicyConfig(k=2, n=3, threshold=threshold),
    )  # fmt: skip
    w = Watcher(cfg).start()
    try:
        for _ in range(200):
            if not w.step():
                break
    finally:
        w.close()
    return state


def copy_state(state: Path, dest: Path) -> Path:
    """A private copy of a replayed state folder (its inbox stays shared, read-only)."""
    shutil.copytree(state, dest, ignore=shutil.ignore_patterns("watch.lock"))
    return dest


def load_shop(state: Path) -> shop.Shop:
    return shop.read(shop.Source.of(state))


_REPLAYS: dict[tuple[Path, Path], Path] = {}


def replayed_once(data: Path, model: Path, tmp_path_factory) -> Path:
    """One replay per test session, shared by the test files (tests that write use a copy)."""
    key = (data, model)
    if key not in _REPLAYS:
        _REPLAYS[key] = replay_store(data, model, tmp_path_factory.mktemp("replay"))
    return _REPLAYS[key]


@contextlib.contextmanager
def serving(state: Path, reviewer: str) -> Iterator[ReviewServer]:
    """The review server on a free loopback port, in a thread, shut down afterwards."""
    srv = ReviewServer(state, "127.0.0.1", 0, None, reviewer)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)
