"""The watcher's state in SQLite (WAL): printers, jobs, layers, decisions, actions, health.

Exactly-once: a batch of layers, the job changes and the decisions they cause are written in one
``BEGIN IMMEDIATE`` transaction, and a file is known by its path relative to the inbox (UNIQUE).
After a crash a file is either recorded with its score, or not at all and scored again. Things
done outside the database afterwards (the reject log, evidence, actions) are driven by flags in
the rows (an outbox), so they are redone, not lost, after a crash.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from inspect3d.data.layout import name_text
from inspect3d.watch.policy import LayerObs

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS printers (name TEXT PRIMARY KEY, current_job INTEGER);
CREATE TABLE IF NOT EXISTS jobs (
  id INTEGER PRIMARY KEY, printer TEXT NOT NULL, name TEXT NOT NULL, status TEXT NOT NULL,
  level TEXT NOT NULL DEFAULT 'OK', opened_at REAL, last_at REAL, closed_at REAL,
  end_reason TEXT, UNIQUE (printer, name));
CREATE TABLE IF NOT EXISTS layers (
  id INTEGER PRIMARY KEY, job_id INTEGER NOT NULL REFERENCES jobs(id), rel TEXT NOT NULL UNIQUE,
  layer INTEGER, size INTEGER, mtime REAL, sha256 TEXT, status TEXT NOT NULL, score REAL,
  label TEXT, probs TEXT, map_peak REAL, map_mean REAL, map BLOB, map_h INTEGER, map_w INTEGER,
  model_sha TEXT, error TEXT, note TEXT, done_at REAL);
CREATE TABLE IF NOT EXISTS decisions (
  id INTEGER PRIMARY KEY, job_id INTEGER NOT NULL REFERENCES jobs(id), kind TEXT NOT NULL,
  level TEXT NOT NULL, record TEXT NOT NULL, created_at REAL, logged INTEGER DEFAULT 0,
  evidence INTEGER DEFAULT 0, UNIQUE (job_id, kind, level));
CREATE TABLE IF NOT EXISTS actions (
  id INTEGER PRIMARY KEY, decision_id INTEGER NOT NULL REFERENCES decisions(id),
  name TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'pending', attempts INTEGER DEFAULT 0,
  error TEXT, done_at REAL, started_at REAL, UNIQUE (decision_id, name));
CREATE TABLE IF NOT EXISTS errors (id INTEGER PRIMARY KEY, at REAL, source TEXT, message TEXT);
CREATE TABLE IF NOT EXISTS reviews (
  id INTEGER PRIMARY KEY, layer_id INTEGER NOT NULL REFERENCES layers(id),
  job_id INTEGER NOT NULL REFERENCES jobs(id), decision TEXT NOT NULL, reason TEXT NOT NULL,
  note TEXT NOT NULL DEFAULT '', reviewer TEXT NOT NULL, at REAL NOT NULL,
  supersedes INTEGER REFERENCES reviews(id));
CREATE INDEX IF NOT EXISTS reviews_by_layer ON reviews (layer_id, id);
CREATE TRIGGER IF NOT EXISTS reviews_no_update BEFORE UPDATE ON reviews
  BEGIN SELECT RAISE(ABORT, 'reviews are append-only: add a new review instead'); END;
CREATE TRIGGER IF NOT EXISTS reviews_no_delete BEFORE DELETE ON reviews
  BEGIN SELECT RAISE(ABORT, 'reviews are append-only: add a new review instead'); END;
"""


def resolve_typed_path(typed: str, state: Path) -> Path:
    """A path the watcher stored as typed (before it stored absolute ones), for any reader.

    It was relative to the watcher's working directory, which is not recorded: the first of
    this working directory and the folders above the state folder where it exists (a watcher
    started in the project folder with ``inbox=outputs/demo/inbox state=outputs/demo/watch``
    is found from the state folder). Absolute paths, and ones found nowhere, are kept.
    """
    path = Path(typed).expanduser()
    if path.is_absolute():
        return path
    for base in (Path.cwd(), *Path(os.path.abspath(state)).parents):
        if (base / path).is_dir():
            return base / path
    return path


def _typed(kind: type, row: sqlite3.Row | None):
    """A row as its dataclass (columns added later are left out, missing ones default)."""
    if row is None:
        return None
    return kind(**_columns(kind, row))


def _columns(kind: type, row: sqlite3.Row) -> dict:
    names = {f.name for f in fields(kind)}
    return {k: v for k, v in dict(row).items() if k in names}


@dataclass(frozen=True)
class JobRow:
    id: int
    printer: str
    name: str
    status: str  # open | closed
    level: str  # OK | WARN | REJECT so far
    opened_at: float | None = None
    last_at: float | None = None
    closed_at: float | None = None
    end_reason: str | None = None  # marker | next_job | idle


@dataclass(frozen=True)
class LayerRow:
    id: int
    job_id: int
    rel: str  # path below the inbox as text (``layout.name_text``)
    status: str  # scored | failed
    layer: int | None = None
    size: int | None = None
    mtime: float | None = None
    sha256: str | None = None
    score: float | None = None
    label: str | None = None
    probs: str | None = None  # JSON
    map_peak: float | None = None
    map_mean: float | None = None
    map: bytes | None = None  # float16 (map_h, map_w)
    map_h: int | None = None
    map_w: int | None = None
    model_sha: str | None = None
    error: str | None = None
    note: str | None = None
    done_at: float | None = None


@dataclass(frozen=True)
class DecisionRow:
    id: int
    job_id: int
    kind: str  # WARN | REJECT | FINAL
    level: str
    record: dict  # the decision as logged (parsed JSON)
    created_at: float | None = None
    logged: int = 0
    evidence: int = 0

    @classmethod
    def of(cls, row: sqlite3.Row) -> DecisionRow:
        d = _columns(cls, row)
        return cls(**{**d, "record": json.loads(d["record"])})


@dataclass(frozen=True)
class PendingAction:
    id: int
    name: str  # command | webhook
    attempts: int
    record: dict  # its decision's record


class Store:
    """One connection to ``STATE/watch.db``; use from one thread. Reads return typed rows."""

    def __init__(self, path: str | Path, readonly: bool = False) -> None:
        self.path = Path(path)
        uri = f"file:{self.path}?mode=ro" if readonly else f"file:{self.path}"
        self.db = sqlite3.connect(uri, uri=True, timeout=10.0, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        if not readonly:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")  # a committed decision survives power loss
            self.db.executescript(SCHEMA)
            self._migrate()

    def _migrate(self) -> None:
        """Columns added since a state folder was first written."""
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(actions)")}
        if "started_at" not in cols:
            self.db.execute("ALTER TABLE actions ADD COLUMN started_at REAL")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All-or-nothing block (``BEGIN IMMEDIATE``: one writer at a time)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # --- reads -------------------------------------------------------------------------------
    def known_rels(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT rel FROM layers")}

    def job(self, printer: str, name: str) -> JobRow | None:
        sql = "SELECT * FROM jobs WHERE printer = ? AND name = ?"
        return _typed(JobRow, self.db.execute(sql, (printer, name)).fetchone())

    def open_jobs(self) -> list[JobRow]:
        sql = "SELECT * FROM jobs WHERE status = 'open' ORDER BY id"
        return [_typed(JobRow, r) for r in self.db.execute(sql)]

    def jobs(self) -> list[JobRow]:
        """Every job, in the order they were opened."""
        return [_typed(JobRow, r) for r in self.db.execute("SELECT * FROM jobs ORDER BY id")]

    def job_layers(self, job_id: int) -> list[LayerRow]:
        """A job's layers (scored and failed) in layer order."""
        sql = "SELECT * FROM layers WHERE job_id = ? ORDER BY layer, id"
        return [_typed(LayerRow, r) for r in self.db.execute(sql, (job_id,))]

    def job_decisions(self, job_id: int) -> list[DecisionRow]:
        sql = "SELECT * FROM decisions WHERE job_id = ? ORDER BY id"
        return [DecisionRow.of(r) for r in self.db.execute(sql, (job_id,))]

    def job_obs(self, job_id: int) -> list[LayerObs]:
        """The job's scored layers in the order they were scored (what the policy saw)."""
        sql = (
            "SELECT layer, score, label FROM layers "
            "WHERE job_id = ? AND status = 'scored' ORDER BY id"
        )
        return [LayerObs(r[0], r[1], r[2]) for r in self.db.execute(sql, (job_id,))]

    def job_dirs(self, job_id: int | None) -> set[str]:
        """Folders that hold only this ended job's files (all ended jobs when ``job_id`` is None):
        those named after the job (a pattern may take the job from the file name instead)."""
        sql = "SELECT l.rel, j.name FROM layers l JOIN jobs j ON j.id = l.job_id WHERE "
        if job_id is None:
            rows = self.db.execute(sql + "j.status = 'closed'")
        else:
            rows = self.db.execute(sql + "j.id = ?", (job_id,))
        dirs = {(rel.rsplit("/", 1)[0], name) for rel, name in rows}
        return {d for d, name in dirs if d.rsplit("/", 1)[-1] == name_text(name)}

    def n_layers(self, job_id: int) -> int:
        return self.db.execute(
            "SELECT COUNT(*) FROM layers WHERE job_id = ?", (job_id,)
        ).fetchone()[0]

    def layer_rows(self, job_id: int, layers: list[int]) -> list[LayerRow]:
        marks = ",".join("?" * len(layers))
        sql = f"SELECT * FROM layers WHERE job_id = ? AND status = 'scored' AND layer IN ({marks})"
        return [_typed(LayerRow, r) for r in self.db.execute(sql, (job_id, *layers))]

    def unlogged(self) -> list[DecisionRow]:
        sql = "SELECT * FROM decisions WHERE logged = 0 ORDER BY id"
        return [DecisionRow.of(r) for r in self.db.execute(sql)]

    def without_evidence(self) -> list[DecisionRow]:
        sql = "SELECT * FROM decisions WHERE evidence = 0 AND logged = 1 ORDER BY id"
        return [DecisionRow.of(r) for r in self.db.execute(sql)]

    def meta(self) -> dict[str, str]:
        meta = {k: v for k, v in self.db.execute("SELECT key, value FROM meta")}
        if meta.get("inbox"):
            inbox = resolve_typed_path(json.loads(meta["inbox"]), self.path.parent)
            meta["inbox"] = json.dumps(str(inbox))
        return meta

    # --- writes (inside ``transaction`` unless said) ------------------------------------------
    def open_job(self, printer: str, name: str, now: float) -> int:
        cur = self.db.execute(
            "INSERT INTO jobs (printer, name, status, opened_at, last_at) "
            "VALUES (?, ?, 'open', ?, ?)",
            (printer, name, now, now),
        )
        self.db.execute(
            "INSERT INTO printers (name, current_job) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET current_job = excluded.current_job",
            (printer, cur.lastrowid),
        )
        return int(cur.lastrowid)

    def close_job(self, job_id: int, reason: str, now: float) -> None:
        sql = "UPDATE jobs SET status = 'closed', closed_at = ?, end_reason = ? WHERE id = ?"
        self.db.execute(sql, (now, reason, job_id))

    def touch_job(self, job_id: int, now: float, level: str) -> None:
        self.db.execute("UPDATE jobs SET last_at = ?, level = ? WHERE id = ?", (now, level, job_id))

    def insert_layer(self, job_id: int, layer: int, result, model_sha: str, now: float) -> None:
        """Record a scored or failed layer (``result``: a scoring.LayerResult)."""
        a, s = result.arrival, result.score
        cols = dict(
            job_id=job_id, rel=a.rel, layer=layer, size=a.size, mtime=a.mtime,
            sha256=result.sha256, status=result.status, error=result.error, note=result.note,
            model_sha=model_sha, done_at=now,
        )  # fmt: skip
        if s is not None:
            m = s.defect_map.astype(np.float16)
            cols.update(
                score=s.defect_score, label=s.label, probs=json.dumps(s.probs),
                map_peak=float(s.defect_map.max()), map_mean=float(s.defect_map.mean()),
                map=m.tobytes(), map_h=m.shape[0], map_w=m.shape[1],
            )  # fmt: skip
        names = ", ".join(cols)
        self.db.execute(
            f"INSERT INTO layers ({names}) VALUES ({', '.join('?' * len(cols))})",
            tuple(cols.values()),
        )

    def add_decision(
        self, job_id: int, kind: str, level: str, record: dict, now: float
    ) -> int | None:
        """Insert a decision once (None if this job already has it); its id goes into the record."""
        cur = self.db.execute(
            "INSERT OR IGNORE INTO decisions (job_id, kind, level, record, created_at) "
            "VALUES (?, ?, ?, '{}', ?)",
            (job_id, kind, level, now),
        )
        if cur.rowcount == 0:
            return None
        did = int(cur.lastrowid)
        record = {"decision_id": did, **record}
        self.db.execute("UPDATE decisions SET record = ? WHERE id = ?", (json.dumps(record), did))
        return did

    def add_action(self, decision_id: int, name: str) -> None:
        sql = "INSERT OR IGNORE INTO actions (decision_id, name) VALUES (?, ?)"
        self.db.execute(sql, (decision_id, name))

    # --- single statements (autocommit) -------------------------------------------------------
    def set_flags(self, decision_ids: list[int], flag: str) -> None:
        """Mark decisions as written to the log / given evidence (one commit for all)."""
        if flag not in ("logged", "evidence"):
            raise ValueError(flag)
        if decision_ids:
            marks = ",".join("?" * len(decision_ids))
            self.db.execute(f"UPDATE decisions SET {flag} = 1 WHERE id IN ({marks})", decision_ids)

    def set_meta(self, **values: object) -> None:
        self.db.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [(k, json.dumps(v)) for k, v in values.items()],
        )

    def record_error(self, source: str, message: str) -> None:
        sql = "INSERT INTO errors (at, source, message) VALUES (?, ?, ?)"
        self.db.execute(sql, (time.time(), source, message))
        self.set_meta(last_error=message, last_error_at=time.time())

    def pending_actions(self) -> list[PendingAction]:
        sql = (
            "SELECT a.id, a.name, a.attempts, d.record FROM actions a "
            "JOIN decisions d ON d.id = a.decision_id WHERE a.status = 'pending' ORDER BY a.id"
        )
        return [PendingAction(r[0], r[1], r[2], json.loads(r[3])) for r in self.db.execute(sql)]

    def start_action(self, action_id: int) -> bool:
        """Commit the intent to run a pending action (before it runs); False if not pending."""
        sql = (
            "UPDATE actions SET status = 'running', started_at = ? "
            "WHERE id = ? AND status = 'pending'"
        )
        return self.db.execute(sql, (time.time(), action_id)).rowcount == 1

    def unstart_action(self, action_id: int) -> None:
        """An action marked running that never started (its thread was cancelled)."""
        sql = (
            "UPDATE actions SET status = 'pending', started_at = NULL "
            "WHERE id = ? AND status = 'running'"
        )
        self.db.execute(sql, (action_id,))

    def interrupted_actions(self) -> list[int]:
        """After a crash: actions that were started and never finished, now marked 'unknown'
        (they may have run; they are not run again: their receiver has the idempotency key)."""
        with self.transaction():
            ids = [r[0] for r in self.db.execute("SELECT id FROM actions WHERE status = 'running'")]
            self.db.execute(
                "UPDATE actions SET status = 'unknown', done_at = ?, error = ? "
                "WHERE status = 'running'",
                (time.time(), "the watcher stopped while it ran: it may have run"),
            )
        return ids

    # --- QA reviews (append-only; the latest review of a layer is its current decision) -------
    def add_review(
        self, layer_id: int, decision: str, reason: str, note: str, reviewer: str, now: float
    ) -> int:
        """Append a review of a layer; it supersedes the layer's previous one (kept as history).

        Values are checked by ``inspect3d.review.decisions``; here only the layer must exist.
        """
        with self.transaction():
            row = self.db.execute("SELECT job_id FROM layers WHERE id = ?", (layer_id,)).fetchone()
            if row is None:
                raise KeyError(layer_id)
            prev = self.db.execute(
                "SELECT MAX(id) FROM reviews WHERE layer_id = ?", (layer_id,)
            ).fetchone()[0]
            cur = self.db.execute(
                "INSERT INTO reviews (layer_id, job_id, decision, reason, note, reviewer, at, "
                "supersedes) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (layer_id, row[0], decision, reason, note, reviewer, now, prev),
            )
        return int(cur.lastrowid)

    def current_reviews(self) -> dict[int, sqlite3.Row]:
        """The latest review of every reviewed layer, by layer id."""
        sql = (
            "SELECT r.* FROM reviews r WHERE r.id = "
            "(SELECT MAX(id) FROM reviews WHERE layer_id = r.layer_id)"
        )
        return {r["layer_id"]: r for r in self.db.execute(sql)}

    def review_history(self, layer_id: int) -> list[sqlite3.Row]:
        """Every review of a layer, newest first."""
        sql = "SELECT * FROM reviews WHERE layer_id = ? ORDER BY id DESC"
        return self.db.execute(sql, (layer_id,)).fetchall()

    def job_reviews(self, job_id: int) -> list[sqlite3.Row]:
        """Every review of a job's layers, newest first."""
        sql = "SELECT * FROM reviews WHERE job_id = ? ORDER BY id DESC"
        return self.db.execute(sql, (job_id,)).fetchall()

    def finish_action(self, action_id: int, status: str, attempts: int, error: str | None) -> None:
        sql = (
            "UPDATE actions SET status = ?, attempts = ?, error = ?, done_at = ? "
            "WHERE id = ? AND status = 'running'"
        )
        self.db.execute(sql, (status, attempts, error, time.time(), action_id))

    def store_id(self) -> str:
        """A random id of this state folder, made once: with a decision id it keys actions
        uniquely across cells (two watchers both have a decision 1)."""
        row = self.db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
        if row is not None:
            return json.loads(row[0])
        sid = uuid.uuid4().hex[:12]
        self.db.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('store_id', ?)", (json.dumps(sid),)
        )
        return json.loads(
            self.db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()[0]
        )


def decode_map(row: LayerRow) -> np.ndarray:
    """The stored defect map of a layer row as float32 (h, w)."""
    m = np.frombuffer(row.map, dtype=np.float16).reshape(row.map_h, row.map_w)
    return m.astype(np.float32)
