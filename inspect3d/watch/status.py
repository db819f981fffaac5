"""``inspect3d status state=STATE|db=URL [cell=NAME] [--json]``: per printer and overall.

Read from the watcher's store: its SQLite file, or a plant database (every cell, or one).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import time
from pathlib import Path

from inspect3d.errors import InspectError
from inspect3d.watch.db import open_store
from inspect3d.watch.store import DecisionRow, JobRow, Store

STALE_S = 30.0  # a cell without a heartbeat this long counts as not running


def summary(state: str | Path | None, db: str | None = None, cell: str | None = None) -> dict:
    """Status of one watcher (its state folder), or of a plant database's cells (``db``; all of
    them when ``cell`` is None)."""
    store = open_store(state, db, cell)
    try:
        return {
            "state": None if state is None else str(state),
            "db": store.where if db is not None else None,
            "cell": cell,
            "printers": _printers(store),
            **store.totals(),
            "health": _health(store.meta(), state),
            "cells": {c: _health(m, state if c == cell else None)
                      for c, m in store.cell_meta().items()},
        }  # fmt: skip
    finally:
        store.close()


def jobs(state: str | Path | None, db: str | None = None, cell: str | None = None) -> list[dict]:
    """Every job: printer, name, verdict so far (final or not), where it was caught."""
    store = open_store(state, db, cell)
    try:
        return [_job(j, store.job_decisions(j.id)) for j in store.jobs()]
    finally:
        store.close()


def _job(job: JobRow, decisions: list[DecisionRow]) -> dict:
    records = {d.kind: d.record for d in decisions}
    caught = records.get("REJECT") or records.get("WARN") or {}
    final = records.get("FINAL")
    return {
        "cell": job.cell,
        "printer": job.printer,
        "job": job.name,
        "verdict": final["verdict"] if final else job.level,
        "final": final is not None,
        "ended_by": job.end_reason,
        "caught_at_layer": caught.get("reason", {}).get("at_layer"),
        "first_bad_layer": caught.get("reason", {}).get("first_bad_layer"),
        "layers_scored": (final or {}).get("reason", {}).get("layers_scored"),
    }


def format_jobs(job_list: list[dict]) -> str:
    """One line per job: its verdict and the layer at which it was caught."""
    lines = [f"{'printer':<14} {'job':<20} {'verdict':<8} {'caught at layer':>15}  ended by"]
    for j in job_list:
        verdict = j["verdict"] if j["final"] else f"{j['verdict']}*"
        caught = "-" if j["caught_at_layer"] is None else str(j["caught_at_layer"])
        printer = f"{j['cell']}/{j['printer']}" if j["cell"] else j["printer"]
        ended = j["ended_by"] or "-"
        lines.append(f"{printer:<14} {j['job']:<20} {verdict:<8} {caught:>15}  {ended}")
    return "\n".join(lines)


def _printers(store: Store) -> dict[str, dict]:
    """Per printer (``cell/printer`` where the store has named cells)."""
    out = {}
    for r in store.printer_status():
        key = f"{r['cell']}/{r['printer']}" if r["cell"] else r["printer"]
        out[key] = {
            "cell": r["cell"], "job": r["job"], "job_status": r["job_status"],
            "layers_scored": r["layers_scored"], "layers_failed": r["layers_failed"],
            "latest_score": r["latest_score"], "decision": r["final"] or r["level"],
            "final": r["final"] is not None,
        }  # fmt: skip
    return out


def running(state: str | Path) -> bool:
    """True while a watcher holds ``STATE/watch.lock`` (the OS drops it when the process dies)."""
    try:
        fd = os.open(Path(state) / "watch.lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _health(meta: dict[str, str], state: str | Path | None) -> dict:
    """A cell's health; ``running`` from its lock when its state folder is here, else from the
    heartbeat (a watcher that stopped cleanly says so)."""
    meta = {k: json.loads(v) for k, v in meta.items()}
    beat = meta.get("heartbeat")
    meta["seconds_since_heartbeat"] = None if beat is None else round(time.time() - beat, 1)
    if state is not None:
        meta["running"] = running(state)
    else:
        age = meta["seconds_since_heartbeat"]
        meta["running"] = meta.get("stopped_at") is None and age is not None and age < STALE_S
    meta.setdefault("last_error", None)
    return meta


def format_text(s: dict) -> str:
    """The human-readable status table."""
    lines = [f"{'printer':<14} {'job':<20} {'scored':>6} {'failed':>6} {'latest':>7}  decision"]
    for name, p in s["printers"].items():
        latest = "-" if p["latest_score"] is None else f"{p['latest_score']:.3f}"
        state = "final" if p["final"] else "running"
        lines.append(
            f"{name:<14} {str(p['job']):<20} {p['layers_scored']:>6} {p['layers_failed']:>6} "
            f"{latest:>7}  {p['decision']} ({state})"
        )
    lines.append(
        f"total: {s['layers_scored']} layers scored, {s['layers_failed']} failed, "
        f"{s['jobs']} jobs, "
        f"{s['rejects']} rejected, {s['warns']} warned, {s['errors']} errors, "
        f"{s['actions_unknown']} actions that may have run"
    )
    plant = s.get("db") is not None and s.get("cell") is None
    cells = s["cells"].items() if plant else [("", s["health"])]
    lines += [f"health{f' {c}' if c else ''}: {_health_text(h)}" for c, h in cells]
    return "\n".join(lines)


def _health_text(h: dict) -> str:
    return (
        f"{'running' if h.get('running') else 'not running'}, "
        f"model {h.get('model')} ({str(h.get('model_sha'))[:12]}) on {h.get('provider')}, "
        f"queue {h.get('queue_depth')}, heartbeat {h.get('seconds_since_heartbeat')} s ago, "
        f"last error: {h.get('last_error')}"
    )


def main(argv: list[str]) -> int:
    """``inspect3d status state=STATE|db=URL [cell=NAME] [--json] [--jobs]``."""
    parser = argparse.ArgumentParser(prog="inspect3d status", description=__doc__)
    parser.add_argument("settings", nargs="*", help="state=STATE, db=URL, cell=NAME")
    parser.add_argument("--state", help="the watcher's state folder")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--jobs", action="store_true", help="also list every job's verdict")
    args = parser.parse_args(argv)
    kv = {"state": args.state}
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep or key not in ("state", "db", "cell"):
            raise InspectError(f"unexpected argument {item!r}: use state=STATE, db=URL, cell=NAME")
        kv[key] = value
    if not kv.get("state") and not kv.get("db"):
        raise InspectError(
            "no state folder given: use `inspect3d status state=STATE [--json]` "
            "(or db=URL [cell=NAME] for a plant database)"
        )
    where = (kv.get("state") or None, kv.get("db"), kv.get("cell") or None)
    s = summary(*where)
    if args.jobs:
        s["jobs_list"] = jobs(*where)
    if args.json:
        print(json.dumps(s, indent=2, sort_keys=True))
    else:
        print(format_text(s) + ("\n" + format_jobs(s["jobs_list"]) if args.jobs else ""))
    return 0
