"""Watcher throughput and latency vs bare ``OnnxModel.predict_batch`` on the same files.

For 1, 10 and 50 simulated printers, in one run:
- throughput: N layers already in the inbox; the watcher drains it (scan, checks, hash, decode,
  score, SQLite transaction, policy, reject log) vs bare scoring of the same files in batches of
  the same size: ``predict_batch`` (decode, then infer) and ``predict_files`` (the next batch
  decoded during inference); reported as layers/s and the watcher's overhead in % over each;
  ``--step-batches 1,8`` measures the watcher scoring 1 or 8 batches of a backlog per step
  (``STEP_BATCHES``: each decoded during the one before) in the same run;
- latency: the printers write layers (temp name + rename) at half the bare rate; file arrival
  (its mtime) to recorded decision, p50/p95. ``settle_s`` (how long a file must be unchanged)
  is part of it by design.

    python benchmarks/speed/watch_throughput.py --model RUN/model.onnx [--layers 200] [--settle 0.2]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sqlite3
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from common import machine_line

from inspect3d.data.synth import SynthConfig, generate
from inspect3d.infer import OnnxModel
from inspect3d.watch import service
from inspect3d.watch.config import WatchConfig
from inspect3d.watch.service import Watcher

BATCH = 16


def layout(files: list[Path], inbox: Path, printers: int, per_job: int = 10) -> list[Path]:
    """Destination paths: file i goes to printer i % P, in jobs of ``per_job`` layers."""
    out = []
    for i, _ in enumerate(files):
        p, k = i % printers, i // printers
        out.append(inbox / f"printer{p:02d}" / f"job{k // per_job:04d}" / f"layer_{k:04d}.png")
    return out


def bare_seconds(model: OnnxModel, files: list[Path]) -> float:
    t = time.perf_counter()
    for i in range(0, len(files), BATCH):
        model.predict_batch(files[i : i + BATCH])
    return time.perf_counter() - t


def overlapped_seconds(model: OnnxModel, files: list[Path]) -> float:
    t = time.perf_counter()
    for _ in model.predict_files(files, batch_size=BATCH):
        pass
    return time.perf_counter() - t


def watcher(model: Path, root: Path, settle: float, until_idle: bool) -> Watcher:
    cfg = WatchConfig(
        model=str(model), inbox=str(root / "inbox"), state=str(root / "state"),
        settle_s=settle, poll_s=0.02, until_idle=until_idle, review=False, batch_size=BATCH,
    )  # fmt: skip
    return Watcher(cfg).start()


def throughput(model: Path, files: list[Path], printers: int, root: Path) -> float:
    """Seconds for a watcher to drain ``files`` already in the inbox."""
    for src, dest in zip(files, layout(files, root / "inbox", printers), strict=True):
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        os.utime(dest, (time.time() - 60, time.time() - 60))  # long stable
    w = watcher(model, root, settle=0.0, until_idle=True)
    w.model.predict_batch(files[:BATCH])  # warm-up, as bare_seconds gets (sustained rate)
    t = time.perf_counter()
    w.run()
    dt = time.perf_counter() - t
    w.close()
    return dt


def latencies(
    model: Path, files: list[Path], printers: int, rate: float, root: Path, settle: float
):
    """Arrival-to-decision seconds of every layer written at ``rate`` layers/s in total."""
    w = watcher(model, root, settle, until_idle=False)
    dests = layout(files, root / "inbox", printers)

    def write() -> None:
        start = time.perf_counter()
        for i, (src, dest) in enumerate(zip(files, dests, strict=True)):
            time.sleep(max(0.0, start + i / rate - time.perf_counter()))
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.part")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        con = sqlite3.connect(root / "state" / "watch.db")
        while con.execute("SELECT COUNT(*) FROM layers").fetchone()[0] < len(files):
            time.sleep(0.05)
        w.stop_requested.set()

    threading.Thread(target=write, daemon=True).start()
    w.run()
    w.close()
    con = sqlite3.connect(root / "state" / "watch.db")
    return [r[0] for r in con.execute("SELECT done_at - mtime FROM layers")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--layers", type=int, default=200)
    ap.add_argument("--printers", default="1,10,50")
    ap.add_argument("--settle", type=float, default=0.2)
    ap.add_argument("--step-batches", default=str(service.STEP_BATCHES))
    ap.add_argument("--rounds", type=int, default=3, help="medians over this many runs of each")
    args = ap.parse_args()
    logging.getLogger("inspect3d").setLevel(logging.ERROR)  # no decision lines here
    model = OnnxModel.load(args.model)
    size = model.meta.preprocess.height
    with tempfile.TemporaryDirectory() as tmp:
        n_jobs = max(1, args.layers // 10)
        generate(
            Path(tmp) / "data", SynthConfig(n_jobs=n_jobs, layers_per_job=10, size=size), False
        )
        files = sorted((Path(tmp) / "data").glob("*/*.png"))[: args.layers]
        print(f"{len(files)} layers of {size} px, batch {BATCH}, settle {args.settle} s; "
              f"{machine_line()}")  # fmt: skip
        heads = ("printers", "steps of", "bare l/s", "files l/s", "watch l/s", "over bare",
                 "over files", "p50 s", "p95 s")  # fmt: skip
        print(" ".join(f"{h:>10}" for h in heads))
        steps = [int(x) for x in args.step_batches.split(",")]
        # each run its own inbox and state: a printer count given twice is measured twice
        for run, p in enumerate(int(x) for x in args.printers.split(",")):
            times = {k: {"bare": [], "over": [], "watch": [], "lat": []} for k in steps}
            for r in range(args.rounds):  # the variants in turn, round by round: drift hits all
                for k in steps:
                    settle = args.settle if r == 0 else None  # latencies: the first round
                    got = measure(model, files, (p, k), Path(tmp) / f"r{run}-{k}-{r}", settle)
                    times[k] = {name: times[k][name] + got[name] for name in got}
            for k, t in times.items():
                print(row(p, k, len(files), t), flush=True)


def measure(
    model: OnnxModel, files: list[Path], setting: tuple[int, int], root: Path, settle: float | None
) -> dict:
    """Seconds of bare scoring, overlapped bare scoring and a watcher, for ``setting``
    (printers, batches per step), and with ``settle`` the arrival-to-decision latencies."""
    printers, step_batches = setting
    service.STEP_BATCHES = step_batches  # what the watcher's loop reads at each step
    bare = [bare_seconds(model, files)]
    over = [overlapped_seconds(model, files)]
    watch = [throughput(Path(model.path), files, printers, root / "t")]
    lat = []
    if settle is not None:
        lat = latencies(Path(model.path), files, printers, 0.5 * len(files) / bare[0],
                        root / "l", settle)  # fmt: skip
    return {"bare": bare, "over": over, "watch": watch, "lat": lat}


def row(printers: int, step_batches: int, n: int, t: dict) -> str:
    bare, over, watch = (statistics.median(t[k]) for k in ("bare", "over", "watch"))
    p50, p95 = np.percentile(t["lat"], [50, 95])
    return (
        f"{printers:>10} {step_batches:>10} {n / bare:>10.1f} {n / over:>10.1f} "
        f"{n / watch:>10.1f} {100 * (watch / bare - 1):>9.1f}% {100 * (watch / over - 1):>9.1f}% "
        f"{p50:>10.3f} {p95:>10.3f}"
    )


if __name__ == "__main__":
    main()
