"""``inspect3d status state=STATE [--json]``: per printer and overall, read from the database."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sqlite3
import time
from pathlib import Path

from inspect3d.errors import InspectError

_PRINTERS = """
SELECT p.name AS printer, j.name AS job, j.id AS job_id, j.status AS job_status, j.level AS level,
  (SELECT COUNT(*) FROM layers l WHERE l.job_id = j.id AND l.status = 'scored') AS layers_scored,
  (SELECT COUNT(*) FROM layers l WHERE l.job_id = j.id AND l.status = 'failed') AS layers_failed,
  (SELECT score FROM layers l WHERE l.job_id = j.id AND l.status = 'scored'
     ORDER BY l.id DESC LIMIT 1) AS latest_score
FROM printers p LEFT JOIN jobs j ON j.id = p.current_job ORDER BY p.name
"""


def summary(state: str | Path) -> dict:
    """Status of the watcher whose state folder is ``state`` (read-only)."""
    db_path = Path(state) / "watch.db"
    if not db_path.is_file():
        raise InspectError(f"no watcher state in {str(state)!r}: {db_path} does not exist")
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10.0)
    db.row_factory = sqlite3.Row
    try:
        return {
            "state": str(state),
            "printers": _printers(db),
            **_totals(db),
            "health": _health(db, state),
        }
    finally:
        db.close()


def jobs(state: str | Path) -> list[dict]:
    """Every job: printer, name, verdict so far (final or not), where it was caught."""
    db = sqlite3.connect(f"file:{Path(state) / 'watch.db'}?mode=ro", uri=True, timeout=10.0)
    db.row_factory = sqlite3.Row
    try:
        return [_job(db, r) for r in db.execute("SELECT * FROM jobs ORDER BY id")]
    finally:
        db.close()


def _job(db: sqlite3.Connection, job: sqlite3.Row) -> dict:
    rows = db.execute(
        "SELECT kind, record FROM decisions WHERE job_id = ? ORDER BY id", (job["id"],)
    )
    records = {kind: json.loads(rec) for kind, rec in rows}
    caught = records.get("REJECT") or records.get("WARN") or {}
    final = records.get("FINAL")
    return {
        "printer": job["printer"],
        "job": job["name"],
        "verdict": final["verdict"] if final else job["level"],
        "final": final is not None,
        "ended_by": job["end_reason"],
        "caught_at_layer": caught.get("reason", {}).get("at_layer"),
        "first_bad_layer": caught.get("reason", {}).get("first_bad_layer"),
        "layers_scored": (final or {}).get("reason", {}).get("layers_scored"),
    }


def format_jobs(state: str | Path) -> str:
    """One line per job: its verdict and the layer at which it was caught."""
    lines = [f"{'printer':<14} {'job':<20} {'verdict':<8} {'caught at layer':>15}  ended by"]
    for j in jobs(state):
        verdict = j["verdict"] if j["final"] else f"{j['verdict']}*"
        caught = "-" if j["caught_at_layer"] is None else str(j["caught_at_layer"])
        lines.append(
            f"{j['printer']:<14} {j['job']:<20} {verdict:<8} {caught:>15}  {j['ended_by'] or '-'}"
        )
    return "\n".join(lines)


def _printers(db: sqlite3.Connection) -> dict[str, dict]:
    out = {}
    for r in db.execute(_PRINTERS):
        final = db.execute(
            "SELECT level FROM decisions WHERE job_id = ? AND kind = 'FINAL'", (r["job_id"],)
        ).fetchone()
        out[r["printer"]] = {
            "job": r["job"], "job_status": r["job_status"], "layers_scored": r["layers_scored"],
            "layers_failed": r["layers_failed"], "latest_score": r["latest_score"],
            "decision": final[0] if final else r["level"], "final": final is not None,
        }  # fmt: skip
    return out


def _totals(db: sqlite3.Connection) -> dict:
    one = lambda sql: db.execute(sql).fetchone()[0]  # noqa: E731
    return {
        "layers_scored": one("SELECT COUNT(*) FROM layers WHERE status = 'scored'"),
        "layers_failed": one("SELECT COUNT(*) FROM layers WHERE status = 'failed'"),
        "jobs": one("SELECT COUNT(*) FROM jobs"),
        "jobs_open": one("SELECT COUNT(*) FROM jobs WHERE status = 'open'"),
        "rejects": one("SELECT COUNT(*) FROM decisions WHERE kind = 'FINAL' AND level = 'REJECT'"),
        "warns": one("SELECT COUNT(*) FROM decisions WHERE kind = 'FINAL' AND level = 'WARN'"),
        "decisions": one("SELECT COUNT(*) FROM decisions"),
        "actions_failed": one("SELECT COUNT(*) FROM actions WHERE status = 'failed'"),
        # started and never finished (the watcher died meanwhile): may have run, not rerun
        "actions_unknown": one("SELECT COUNT(*) FROM actions WHERE status = 'unknown'"),
        "errors": one("SELECT COUNT(*) FROM errors"),
    }


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


def _health(db: sqlite3.Connection, state: str | Path) -> dict:
    meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
    meta["running"] = running(state)
    meta.setdefault("last_error", None)
    beat = meta.get("heartbeat")
    meta["seconds_since_heartbeat"] = None if beat is None else round(time.time() - beat, 1)
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
    h = s["health"]
    lines.append(
        f"total: {s['layers_scored']} layers scored, {s['layers_failed']} failed, "
        f"{s['jobs']} jobs, "
        f"{s['rejects']} rejected, {s['warns']} warned, {s['errors']} errors, "
        f"{s['actions_unknown']} actions that may have run"
    )
    lines.append(
        f"health: {'running' if h.get('running') else 'not running'}, "
        f"model {h.get('model')} ({str(h.get('model_sha'))[:12]}) on {h.get('provider')}, "
        f"queue {h.get('queue_depth')}, heartbeat {h.get('seconds_since_heartbeat')} s ago, "
        f"last error: {h.get('last_error')}"
    )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """``inspect3d status state=STATE [--json]`` (``--state STATE`` works too)."""
    parser = argparse.ArgumentParser(prog="inspect3d status", description=__doc__)
    parser.add_argument("state_kv", nargs="?", help="state=STATE: the watcher's state folder")
    parser.add_argument("--state", help="the watcher's state folder")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--jobs", action="store_true", help="also list every job's verdict")
    args = parser.parse_args(argv)
    state = args.state
    if args.state_kv is not None:
        if not args.state_kv.startswith("state="):
            raise InspectError(f"unexpected argument {args.state_kv!r}: use state=STATE")
        state = args.state_kv.split("=", 1)[1]
    if not state:
        raise InspectError("no state folder given: use `inspect3d status state=STATE [--json]`")
    s = summary(state)
    if args.jobs:
        s["jobs_list"] = jobs(state)
    if args.json:
        print(json.dumps(s, indent=2, sort_keys=True))
    else:
        print(format_text(s) + ("\n" + format_jobs(state) if args.jobs else ""))
    return 0
