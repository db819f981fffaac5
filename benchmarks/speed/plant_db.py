"""Many watchers, one database: N watcher processes x P printers replaying layers at R layers/s
each into one PostgreSQL database, against the same replay into one SQLite file per cell.

Each watcher process runs the watcher's own job book (``inspect3d.watch.jobbook``: every batch
of layers, the jobs it opens and ends and the decisions it causes in one transaction) on
synthetic scores, so what is measured is the store, not the model: the commit latency of a
batch (one layer per printer, as the printers deliver them together), the layers per second
recorded, and afterwards that every layer sent is in the database once (0 lost, 0 duplicates)
and every job has its decisions once.

    python benchmarks/speed/plant_db.py [--watchers 4 --printers 5 --rate 2 --seconds 20]
    [--db postgresql://USER@HOST:PORT/NAME]   (else a throwaway cluster, as the tests make)

The PostgreSQL server runs on the same machine as the watchers, so on a small machine they
compete for its cores; the figures say so with the machine line.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from common import machine_line, update_section

from inspect3d.infer.model import LayerScore
from inspect3d.watch.config import WatchConfig
from inspect3d.watch.db import open_store, shown_url
from inspect3d.watch.inbox import Arrival
from inspect3d.watch.jobbook import JobBook, ModelStamp
from inspect3d.watch.policy import PolicyConfig
from inspect3d.watch.scoring import LayerResult

LAYERS_PER_JOB = 40
TESTS = Path(__file__).resolve().parents[2] / "tests"


@dataclass(frozen=True)
class Replay:
    """The sizes of one run (the issue asks 20 watchers x 5 printers at 10 layers/s)."""

    watchers: int
    printers: int
    rate: float  # layers per second per printer
    seconds: float
    map_px: int  # side of the stored defect map


def results(p: int, tick: int, rng: np.random.Generator, size: int) -> list[LayerResult]:
    """One layer of each of ``p`` printers: tick ``tick`` of the replay."""
    job, layer = divmod(tick, LAYERS_PER_JOB)
    out = []
    for i in range(p):
        score = float(rng.uniform(0, 0.7))
        rel = f"p{i}/job{job:04d}/layer_{layer + 1:04d}.png"
        a = Arrival(Path(rel), rel, f"p{i}", f"job{job:04d}", layer + 1, 1000, time.time())
        dmap = rng.random((size, size), dtype=np.float32) * score
        s = LayerScore("ok", {"ok": 1 - score, "streak": score}, score, "ok", 0.5, dmap)
        out.append(LayerResult(a, "scored", "0" * 64, s))
    return out


def watcher(where: tuple, replay: Replay, seed: int, queue: mp.Queue) -> None:
    """One watcher: record a batch per tick, on time, for ``replay.seconds``; latencies out."""
    state, db, cell = where
    state.mkdir(parents=True, exist_ok=True)
    store = open_store(state, db, cell, create=True)
    cfg = WatchConfig(model="-", inbox="-", state=str(state), db=db, cell=cell,
                      policy=PolicyConfig(k=3, n=5, threshold=0.5))  # fmt: skip
    book = JobBook(store, cfg, [], lambda *_: None)
    book.model = ModelStamp({"sha256": "0" * 64}, 0.5, None, None)
    rng, lat, sent = np.random.default_rng(seed), [], 0
    start, tick = time.perf_counter(), 0
    while time.perf_counter() < start + replay.seconds:
        if replay.rate > 0:  # paced like printers; 0: as fast as the store takes them
            time.sleep(max(0.0, start + tick / replay.rate - time.perf_counter()))
        batch = results(replay.printers, tick, rng, replay.map_px)
        t0 = time.perf_counter()
        book.record(batch)
        lat.append(time.perf_counter() - t0)
        sent += len(batch)
        tick += 1
    queue.put((state.name, sent, lat, time.perf_counter() - start))
    store.close()


def run(replay: Replay, db: str | None, root: Path) -> dict:
    """All watchers at once, into ``db`` (None: an SQLite file per cell below ``root``)."""
    queue: mp.Queue = mp.Queue()
    procs = []
    for w in range(replay.watchers):
        cell = f"cell{w:02d}"
        where = (root / cell, db, cell if db else None)
        procs.append(mp.Process(target=watcher, args=(where, replay, w, queue)))
    for p in procs:
        p.start()
    outs = [queue.get(timeout=replay.seconds + 300) for _ in procs]
    for p in procs:
        p.join()
    lat = sorted(x for o in outs for x in o[2])
    sent = sum(o[1] for o in outs)
    found = count_rows(db, root, [o[0] for o in outs])
    return {
        "sent": sent, "recorded": found["layers"], "lost": sent - found["distinct"],
        "duplicates": found["layers"] - found["distinct"], "decision_repeats": found["repeats"],
        "p50_ms": 1000 * statistics.median(lat), "p95_ms": 1000 * lat[int(0.95 * (len(lat) - 1))],
        "layers_per_s": sent / max(o[3] for o in outs), "batches": len(lat),
    }  # fmt: skip


def count_rows(db: str | None, root: Path, cells: list[str]) -> dict:
    """Layers recorded, distinct (cell, path)s, decisions repeated, over all cells."""
    total = {"layers": 0, "distinct": 0, "repeats": 0}
    stores = [open_store(None, db)] if db else [open_store(root / c) for c in cells]
    for store in stores:
        total["layers"] += store.scalar("SELECT COUNT(*) FROM layers")
        total["distinct"] += store.scalar(
            "SELECT COUNT(*) FROM (SELECT DISTINCT cell, rel FROM layers) d"
        )
        total["repeats"] += store.scalar(
            "SELECT COUNT(*) - COUNT(DISTINCT job_id || '/' || kind) FROM decisions"
        )
        store.close()
    return total


def table_rows(replay: Replay, sqlite: dict, pg: dict) -> list[str]:
    paced = f"{replay.rate:g}/s per printer" if replay.rate else "flat out"
    return [
        f"| {name} | {replay.watchers} x {replay.printers}, {paced} | {r['sent']} | {r['lost']} "
        f"| {r['duplicates']} | {r['decision_repeats']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} "
        f"| {r['layers_per_s']:.0f} |"
        for name, r in (("SQLite, a file per cell", sqlite), ("PostgreSQL, one database", pg))
    ]


def report(runs: list[tuple[Replay, dict, dict]], shown: str) -> str:
    replay = runs[0][0]
    offered = replay.watchers * replay.printers * replay.rate
    rows = [row for run in runs for row in table_rows(*run)]
    setup = (
        f"{replay.watchers} watchers x {replay.printers} printers, each printer "
        f"{replay.rate:g} layers/s ({offered:g} layers/s offered) for {replay.seconds:g} s, then "
        f"the same watchers flat out for {runs[-1][0].seconds:g} s (layers/s: what the store "
        f"takes); a batch is one layer per printer of a watcher ({replay.map_px}² defect map "
        "stored per layer), recorded by the watcher's job book in one transaction (jobs of 40 "
        f"layers opened, ended and decided on the way); PostgreSQL {shown}, fsync on, on the "
        f"same machine; SQLite with `synchronous=FULL`. Machine: {machine_line()}."
    )
    scale = (
        "The issue's size is 20 watchers x 5 printers at 10 layers/s (1000 layers/s) for a "
        "few minutes; this 2-core machine, shared with other work, runs the watchers and the "
        "server together, so the run is scaled down (`--watchers --printers --rate --seconds` "
        "set it). Latency is the job book's whole transaction (policy and decisions included): "
        "what a watcher waits per batch. SQLite's files are independent; PostgreSQL's one "
        "server takes every cell's commits."
    )
    head = (
        "| store | watchers x printers | layers sent | lost | duplicates | decisions repeated "
        "| commit p50 ms | commit p95 ms | layers/s |\n|---|---|---|---|---|---|---|---|---|"
    )
    title = "## Many watchers, one database (`benchmarks/speed/plant_db.py`)"
    return "\n".join([title, "", setup, "", head, *rows, "", scale])


def throwaway_cluster():
    """A temp cluster as the tests make one (``tests/pgcluster.py``)."""
    spec = importlib.util.spec_from_file_location("pgcluster", TESTS / "pgcluster.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["pgcluster"] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module, module.make_cluster(durable=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--watchers", type=int, default=4)
    ap.add_argument("--printers", type=int, default=5)
    ap.add_argument("--rate", type=float, default=2.0, help="layers/s per printer")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--flat-seconds", type=float, default=10.0, help="then flat out this long")
    ap.add_argument("--map-px", type=int, default=32)
    ap.add_argument("--db", help="a PostgreSQL URL (an empty database); default: a temp cluster")
    ap.add_argument("--no-doc", action="store_true", help="print only, leave docs/speed.md")
    a = ap.parse_args()
    paced = Replay(a.watchers, a.printers, a.rate, a.seconds, a.map_px)
    flat = Replay(a.watchers, a.printers, 0.0, a.flat_seconds, a.map_px)
    module, cluster = (None, None) if a.db else throwaway_cluster()
    try:
        urls = [a.db] if a.db else [cluster.create_db(), cluster.create_db()]
        runs = [(r, both(r, url)) for r, url in zip((paced, flat), urls * 2, strict=False)]
    finally:
        if cluster is not None:
            module.remove(cluster)
    shown = "15 (a temp cluster)" if cluster else shown_url(a.db)
    text = report([(r, *res) for r, res in runs], shown)
    print(text)
    if not a.no_doc:
        update_section("plant_db", text)


def both(replay: Replay, url: str) -> tuple[dict, dict]:
    """The replay into SQLite files, then into the database ``url``."""
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = run(replay, None, Path(tmp))
    with tempfile.TemporaryDirectory() as tmp:
        pg = run(replay, url, Path(tmp))
    return sqlite, pg


if __name__ == "__main__":
    main()
