"""The watcher's state: printers, jobs, layers, decisions, actions, health, QA reviews.

Two backends share this module's SQL: SQLite (WAL, ``STATE/watch.db``, the default: embedded,
nothing to install) and PostgreSQL (``inspect3d.watch.store_pg``: one database for a plant of
watchers). Each watcher writes the rows of its own *cell* (one inbox of printers); readers see
one cell or the whole plant (``cell=None``). An SQLite file holds one cell, named ``''``.

Exactly-once: a batch of layers, the job changes and the decisions they cause are written in one
transaction, and a file is known by its cell and its path relative to the inbox (UNIQUE). After a
crash a file is either recorded with its score, or not at all and scored again. Things done
outside the database afterwards (the reject log, evidence, actions) are driven by flags in the
rows (an outbox), so they are redone, not lost, after a crash.
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

SCHEMA_VERSION = 2

SQLITE_SCHEMA_V1 = """
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


# Version 2: the cell of every row, so one database can hold a plant (SQLite keeps one cell).
SQLITE_V2 = """
ALTER TABLE meta ADD COLUMN cell TEXT NOT NULL DEFAULT '';
ALTER TABLE printers ADD COLUMN cell TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN cell TEXT NOT NULL DEFAULT '';
ALTER TABLE layers ADD COLUMN cell TEXT NOT NULL DEFAULT '';
ALTER TABLE errors ADD COLUMN cell TEXT NOT NULL DEFAULT '';
CREATE UNIQUE INDEX IF NOT EXISTS meta_by_cell ON meta (cell, key);
CREATE UNIQUE INDEX IF NOT EXISTS printers_by_cell ON printers (cell, name);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_cell ON jobs (cell, printer, name);
CREATE UNIQUE INDEX IF NOT EXISTS layers_by_cell ON layers (cell, rel);
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, upgraded_at REAL);
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
    cell: str = ""  # the watcher's cell ('' in an SQLite file)


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
    cell: str = ""


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
    """The SQLite backend (``STATE/watch.db``) and the SQL both backends share.

    Use from one thread. Reads return typed rows. ``cell`` is the cell this store writes and
    reads (an SQLite file has one, ``''``); ``None`` reads every cell (plant readers only).
    """

    kind = "sqlite"
    # errors of the database itself (disk full, locked, server gone): the watcher retries
    errors: tuple[type[BaseException], ...] = (sqlite3.Error,)
    # of those, the ones not about a row's own content (a UNIQUE violation is)
    transient: tuple[type[BaseException], ...] = (sqlite3.OperationalError, OSError)
    begin = "BEGIN IMMEDIATE"  # one writer at a time
    lock_row = ""  # what locks a row read before an insert that depends on it

    def __init__(self, path: str | Path, readonly: bool = False, cell: str | None = "") -> None:
        self.path = Path(path)
        self.state: Path | None = self.path.parent
        self.cell = cell
        self.reconnected = False  # set when a lost connection was made again (PostgreSQL)
        uri = f"file:{self.path}?mode=ro" if readonly else f"file:{self.path}"
        self.db = sqlite3.connect(uri, uri=True, timeout=10.0, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        if not readonly:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")  # a committed decision survives power loss
            self.upgrade()

    @property
    def where(self) -> str:
        """Where the history lives, as shown to people (never with a password)."""
        return str(self.path)

    # --- schema versions -------------------------------------------------------------------------
    def version(self) -> int:
        """The schema version of the database (0: empty)."""
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master")}
        if "schema_version" in tables:
            return int(self.db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0])
        return 1 if "jobs" in tables else 0

    def upgrade(self) -> int:
        """Bring the schema to ``SCHEMA_VERSION`` (each step once, in one transaction)."""
        if self.version() >= SCHEMA_VERSION:
            return self.version()
        self.db.executescript(SQLITE_SCHEMA_V1)
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(actions)")}
        if "started_at" not in cols:  # added within version 1
            self.db.execute("ALTER TABLE actions ADD COLUMN started_at REAL")
        with self._atomic():
            if self.version() < 2:
                for statement in SQLITE_V2.split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                self.db.execute(
                    "INSERT INTO schema_version VALUES (?, ?)", (SCHEMA_VERSION, time.time())
                )
        return SCHEMA_VERSION

    # --- the statements: the dialect of PostgreSQL overrides these -----------------------------
    def execute(self, sql: str, params: tuple | list = ()):
        return self.db.execute(sql, params)

    def executemany(self, sql: str, rows: list[tuple]) -> None:
        self.db.executemany(sql, rows)

    def insert_id(self, sql: str, params: tuple) -> int | None:
        """Run an ``INSERT ... RETURNING id``; the new id, or None when nothing was inserted."""
        rows = self.execute(sql, params).fetchall()
        return int(rows[0][0]) if rows else None

    def ensure_connected(self) -> None:
        """Connect again if the connection was lost (an SQLite file is never lost)."""

    def scalar(self, sql: str, params: tuple | list = ()):
        return self.execute(sql, params).fetchone()[0]

    def close(self) -> None:
        self.db.close()

    def transaction(self):
        """All-or-nothing block (``BEGIN IMMEDIATE``: one writer at a time)."""
        return self._atomic()

    @contextmanager
    def _atomic(self) -> Iterator[object]:
        self.db.execute(self.begin)
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _cell(self, table: str = "") -> tuple[str, tuple]:
        """The SQL and parameters that keep a query to this store's cell (all when None); the
        parameters go last (an equality, so the cell's indexes serve the watcher's queries)."""
        if self.cell is None:
            return "1 = 1", ()
        return f"{table}{'.' if table else ''}cell = ?", (self.cell,)

    # --- reads -------------------------------------------------------------------------------
    def known_rels(self) -> set[str]:
        where, p = self._cell()
        return {r[0] for r in self.execute(f"SELECT rel FROM layers WHERE {where}", p)}

    def job(self, printer: str, name: str) -> JobRow | None:
        where, p = self._cell()
        sql = f"SELECT * FROM jobs WHERE printer = ? AND name = ? AND {where}"
        return _typed(JobRow, self.execute(sql, (printer, name, *p)).fetchone())

    def job_by_id(self, job_id: int) -> JobRow | None:
        return _typed(JobRow, self.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def open_jobs(self) -> list[JobRow]:
        where, p = self._cell()
        sql = f"SELECT * FROM jobs WHERE status = 'open' AND {where} ORDER BY id"
        return [_typed(JobRow, r) for r in self.execute(sql, p)]

    def jobs(self) -> list[JobRow]:
        """Every job (of the cell, or of the plant), in the order they were opened."""
        where, p = self._cell()
        return [_typed(JobRow, r) for r in self.execute(f"SELECT * FROM jobs WHERE {where} "
                                                       "ORDER BY id", p)]  # fmt: skip

    def cells(self) -> list[str]:
        """The cells with history here (one, ``''``, in an SQLite file)."""
        sql = "SELECT DISTINCT cell FROM jobs UNION SELECT DISTINCT cell FROM meta ORDER BY 1"
        return [r[0] for r in self.execute(sql)]

    def job_layers(self, job_id: int) -> list[LayerRow]:
        """A job's layers (scored and failed) in layer order."""
        sql = "SELECT * FROM layers WHERE job_id = ? ORDER BY layer, id"
        return [_typed(LayerRow, r) for r in self.execute(sql, (job_id,))]

    def job_decisions(self, job_id: int) -> list[DecisionRow]:
        sql = "SELECT * FROM decisions WHERE job_id = ? ORDER BY id"
        return [DecisionRow.of(r) for r in self.execute(sql, (job_id,))]

    def job_obs(self, job_id: int) -> list[LayerObs]:
        """The job's scored layers in the order they were scored (what the policy saw)."""
        sql = (
            "SELECT layer, score, label FROM layers "
            "WHERE job_id = ? AND status = 'scored' ORDER BY id"
        )
        return [LayerObs(r[0], r[1], r[2]) for r in self.execute(sql, (job_id,))]

    def job_dirs(self, job_id: int | None) -> set[str]:
        """Folders that hold only this ended job's files (all ended jobs when ``job_id`` is None):
        those named after the job (a pattern may take the job from the file name instead)."""
        sql = "SELECT l.rel, j.name FROM layers l JOIN jobs j ON j.id = l.job_id WHERE "
        if job_id is None:
            where, p = self._cell("j")
            rows = self.execute(sql + f"j.status = 'closed' AND {where}", p)
        else:
            rows = self.execute(sql + "j.id = ?", (job_id,))
        dirs = {(rel.rsplit("/", 1)[0], name) for rel, name in rows}
        return {d for d, name in dirs if d.rsplit("/", 1)[-1] == name_text(name)}

    def n_layers(self, job_id: int) -> int:
        return self.scalar("SELECT COUNT(*) FROM layers WHERE job_id = ?", (job_id,))

    def layer_rows(self, job_id: int, layers: list[int]) -> list[LayerRow]:
        marks = ",".join("?" * len(layers))
        sql = f"SELECT * FROM layers WHERE job_id = ? AND status = 'scored' AND layer IN ({marks})"
        return [_typed(LayerRow, r) for r in self.execute(sql, (job_id, *layers))]

    def _decisions_where(self, flags: str) -> list[DecisionRow]:
        where, p = self._cell("j")
        sql = (
            "SELECT d.* FROM decisions d JOIN jobs j ON j.id = d.job_id "
            f"WHERE {flags} AND {where} ORDER BY d.id"
        )
        return [DecisionRow.of(r) for r in self.execute(sql, p)]

    def unlogged(self) -> list[DecisionRow]:
        return self._decisions_where("d.logged = 0")

    def without_evidence(self) -> list[DecisionRow]:
        return self._decisions_where("d.evidence = 0 AND d.logged = 1")

    def meta(self) -> dict[str, str]:
        """The cell's settings and health, as JSON texts (the first cell's for a plant reader)."""
        cell = self.cell if self.cell is not None else next(iter(self.cells()), "")
        return self.cell_meta().get(cell, {})

    def cell_meta(self) -> dict[str, dict[str, str]]:
        """Every cell's settings and health (one cell when this store has one), as JSON texts."""
        where, p = self._cell()
        out: dict[str, dict[str, str]] = {}
        for cell, key, value in self.execute(f"SELECT cell, key, value FROM meta WHERE {where}", p):
            out.setdefault(cell, {})[key] = value
        for meta in out.values():
            if meta.get("inbox"):
                base = self.state or Path(json.loads(meta.get("state", '"."')))
                inbox = resolve_typed_path(json.loads(meta["inbox"]), base)
                meta["inbox"] = json.dumps(str(inbox))
        return out

    # --- status: counts of a cell or the plant --------------------------------------------------
    def printer_status(self) -> list[dict]:
        """Per printer: its current job, layers scored and failed, latest score, verdict."""
        where, p = self._cell("p")
        sql = f"""
SELECT p.cell AS cell, p.name AS printer, j.name AS job, j.id AS job_id, j.status AS job_status,
  j.level AS level,
  (SELECT COUNT(*) FROM layers l WHERE l.job_id = j.id AND l.status = 'scored') AS layers_scored,
  (SELECT COUNT(*) FROM layers l WHERE l.job_id = j.id AND l.status = 'failed') AS layers_failed,
  (SELECT score FROM layers l WHERE l.job_id = j.id AND l.status = 'scored'
     ORDER BY l.id DESC LIMIT 1) AS latest_score,
  (SELECT level FROM decisions d WHERE d.job_id = j.id AND d.kind = 'FINAL') AS final
FROM printers p LEFT JOIN jobs j ON j.id = p.current_job WHERE {where} ORDER BY p.cell, p.name
"""
        return [dict(r) for r in self.execute(sql, p)]

    def totals(self) -> dict:
        """Counts of layers, jobs, verdicts, actions and errors."""
        cj, p = self._cell("j")
        via_job = f"JOIN jobs j ON j.id = {{}}.job_id WHERE {cj} AND "
        d_, l_ = via_job.format("d"), via_job.format("l")
        count = {
            "layers_scored": f"FROM layers l {l_} l.status = 'scored'",
            "layers_failed": f"FROM layers l {l_} l.status = 'failed'",
            "jobs": f"FROM jobs j WHERE {cj}",
            "jobs_open": f"FROM jobs j WHERE {cj} AND j.status = 'open'",
            "rejects": f"FROM decisions d {d_} d.kind = 'FINAL' AND d.level = 'REJECT'",
            "warns": f"FROM decisions d {d_} d.kind = 'FINAL' AND d.level = 'WARN'",
            "decisions": f"FROM decisions d {d_} 1 = 1",
            "actions_failed": f"FROM actions a JOIN decisions d ON d.id = a.decision_id {d_} "
            "a.status = 'failed'",
            # started and never finished (the watcher died meanwhile): may have run, not rerun
            "actions_unknown": f"FROM actions a JOIN decisions d ON d.id = a.decision_id {d_} "
            "a.status = 'unknown'",
            "errors": f"FROM errors j WHERE {cj}",
        }
        return {k: self.scalar(f"SELECT COUNT(*) {sql}", p) for k, sql in count.items()}

    # --- writes (inside ``transaction`` unless said) ------------------------------------------
    def open_job(self, printer: str, name: str, now: float) -> int:
        job_id = self.insert_id(
            "INSERT INTO jobs (cell, printer, name, status, opened_at, last_at) "
            "VALUES (?, ?, ?, 'open', ?, ?) RETURNING id",
            (self.cell, printer, name, now, now),
        )
        self.execute(
            "INSERT INTO printers (cell, name, current_job) VALUES (?, ?, ?) "
            "ON CONFLICT(cell, name) DO UPDATE SET current_job = excluded.current_job",
            (self.cell, printer, job_id),
        )
        return int(job_id)

    def close_job(self, job_id: int, reason: str, now: float) -> None:
        sql = "UPDATE jobs SET status = 'closed', closed_at = ?, end_reason = ? WHERE id = ?"
        self.execute(sql, (now, reason, job_id))

    def touch_job(self, job_id: int, now: float, level: str) -> None:
        self.execute("UPDATE jobs SET last_at = ?, level = ? WHERE id = ?", (now, level, job_id))

    def insert_layer(self, job_id: int, layer: int, result, model_sha: str, now: float) -> None:
        """Record a scored or failed layer (``result``: a scoring.LayerResult)."""
        a, s = result.arrival, result.score
        cols = dict(
            cell=self.cell, job_id=job_id, rel=a.rel, layer=layer, size=a.size, mtime=a.mtime,
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
        self.insert_row("layers", cols, returning=None)

    def insert_row(self, table: str, cols: dict, returning: str | None = "id") -> int | None:
        """Insert one row of ``table`` (names from this module, values as parameters)."""
        names, marks = ", ".join(cols), ", ".join("?" * len(cols))
        sql = f"INSERT INTO {table} ({names}) VALUES ({marks})"
        if returning is None:
            self.execute(sql, tuple(cols.values()))
            return None
        return self.insert_id(f"{sql} RETURNING {returning}", tuple(cols.values()))

    def table_rows(self, table: str) -> list[dict]:
        """Every row of one of this module's tables in this cell, in id order (for copies)."""
        if table in ("decisions", "actions", "reviews"):
            where, p = self._cell("j")
            key = {"decisions": "t.job_id", "reviews": "t.job_id"}.get(table)
            on = key or "(SELECT d.job_id FROM decisions d WHERE d.id = t.decision_id)"
            sql = (
                f"SELECT t.* FROM {table} t JOIN jobs j ON j.id = {on} WHERE {where} ORDER BY t.id"
            )
        else:
            where, p = self._cell()
            order = "id" if table not in ("meta", "printers") else "1, 2"
            sql = f"SELECT * FROM {table} WHERE {where} ORDER BY {order}"
        return [dict(r) for r in self.execute(sql, p)]

    def move_ids_past(self, table: str, value: int) -> None:
        """New ids of ``table`` start above ``value`` (SQLite: they already follow the largest)."""

    def add_decision(
        self, job_id: int, kind: str, level: str, record: dict, now: float
    ) -> int | None:
        """Insert a decision once (None if this job already has it); its id goes into the record."""
        did = self.insert_id(
            "INSERT INTO decisions (job_id, kind, level, record, created_at) "
            "VALUES (?, ?, ?, '{}', ?) ON CONFLICT DO NOTHING RETURNING id",
            (job_id, kind, level, now),
        )
        if did is None:
            return None
        record = {"decision_id": did, **record}
        self.execute("UPDATE decisions SET record = ? WHERE id = ?", (json.dumps(record), did))
        return did

    def add_action(self, decision_id: int, name: str) -> None:
        sql = "INSERT INTO actions (decision_id, name) VALUES (?, ?) ON CONFLICT DO NOTHING"
        self.execute(sql, (decision_id, name))

    # --- single statements (autocommit) -------------------------------------------------------
    def set_flags(self, decision_ids: list[int], flag: str) -> None:
        """Mark decisions as written to the log / given evidence (one commit for all)."""
        if flag not in ("logged", "evidence"):
            raise ValueError(flag)
        if decision_ids:
            marks = ",".join("?" * len(decision_ids))
            self.execute(f"UPDATE decisions SET {flag} = 1 WHERE id IN ({marks})", decision_ids)

    def set_meta(self, **values: object) -> None:
        self.executemany(
            "INSERT INTO meta (cell, key, value) VALUES (?, ?, ?) "
            "ON CONFLICT(cell, key) DO UPDATE SET value = excluded.value",
            [(self.cell, k, json.dumps(v)) for k, v in values.items()],
        )

    def record_error(self, source: str, message: str) -> None:
        sql = "INSERT INTO errors (cell, at, source, message) VALUES (?, ?, ?, ?)"
        self.execute(sql, (self.cell, time.time(), source, message))
        self.set_meta(last_error=message, last_error_at=time.time())

    def _actions_of_cell(self) -> tuple[str, tuple]:
        where, p = self._cell("j")
        sub = f"SELECT d.id FROM decisions d JOIN jobs j ON j.id = d.job_id WHERE {where}"
        return f"decision_id IN ({sub})", p

    def pending_actions(self) -> list[PendingAction]:
        where, p = self._actions_of_cell()
        sql = (
            "SELECT a.id, a.name, a.attempts, d.record FROM actions a "
            "JOIN decisions d ON d.id = a.decision_id "
            f"WHERE a.status = 'pending' AND a.{where} ORDER BY a.id"
        )
        return [PendingAction(r[0], r[1], r[2], json.loads(r[3])) for r in self.execute(sql, p)]

    def start_action(self, action_id: int) -> bool:
        """Commit the intent to run a pending action (before it runs); False if not pending."""
        sql = (
            "UPDATE actions SET status = 'running', started_at = ? "
            "WHERE id = ? AND status = 'pending'"
        )
        return self.execute(sql, (time.time(), action_id)).rowcount == 1

    def unstart_action(self, action_id: int) -> None:
        """An action marked running that never started (its thread was cancelled)."""
        sql = (
            "UPDATE actions SET status = 'pending', started_at = NULL "
            "WHERE id = ? AND status = 'running'"
        )
        self.execute(sql, (action_id,))

    def interrupted_actions(self) -> list[int]:
        """After a crash: this cell's actions that were started and never finished, now marked
        'unknown' (they may have run; they are not run again: their receiver has the
        idempotency key)."""
        where, p = self._actions_of_cell()
        with self.transaction():
            ids = [r[0] for r in self.execute(
                f"SELECT id FROM actions WHERE status = 'running' AND {where}", p
            )]  # fmt: skip
            self.execute(
                "UPDATE actions SET status = 'unknown', done_at = ?, error = ? "
                f"WHERE status = 'running' AND {where}",
                (time.time(), "the watcher stopped while it ran: it may have run", *p),
            )
        return ids

    def finish_action(self, action_id: int, status: str, attempts: int, error: str | None) -> None:
        sql = (
            "UPDATE actions SET status = ?, attempts = ?, error = ?, done_at = ? "
            "WHERE id = ? AND status = 'running'"
        )
        self.execute(sql, (status, attempts, error, time.time(), action_id))

    # --- QA reviews (append-only; the latest review of a layer is its current decision) -------
    def add_review(
        self, layer_id: int, decision: str, reason: str, note: str, reviewer: str, now: float
    ) -> int:
        """Append a review of a layer; it supersedes the layer's previous one (kept as history).

        Values are checked by ``inspect3d.review.decisions``; here only the layer must exist.
        Two reviewers at once: the layer's row is locked, so each review supersedes the other.
        """
        with self.transaction():
            sql = f"SELECT job_id FROM layers WHERE id = ?{self.lock_row}"
            row = self.execute(sql, (layer_id,)).fetchone()
            if row is None:
                raise KeyError(layer_id)
            prev = self.scalar("SELECT MAX(id) FROM reviews WHERE layer_id = ?", (layer_id,))
            return int(self.insert_id(
                "INSERT INTO reviews (layer_id, job_id, decision, reason, note, reviewer, at, "
                "supersedes) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (layer_id, row[0], decision, reason, note, reviewer, now, prev),
            ))  # fmt: skip

    def current_reviews(self) -> dict[int, dict]:
        """The latest review of every reviewed layer (of the cell or plant), by layer id."""
        where, p = self._cell("j")
        sql = (
            "SELECT r.* FROM reviews r JOIN jobs j ON j.id = r.job_id WHERE r.id = "
            f"(SELECT MAX(id) FROM reviews WHERE layer_id = r.layer_id) AND {where}"
        )
        return {r["layer_id"]: dict(r) for r in self.execute(sql, p)}

    def review_history(self, layer_id: int) -> list[dict]:
        """Every review of a layer, newest first."""
        sql = "SELECT * FROM reviews WHERE layer_id = ? ORDER BY id DESC"
        return [dict(r) for r in self.execute(sql, (layer_id,))]

    def job_reviews(self, job_id: int) -> list[dict]:
        """Every review of a job's layers, newest first."""
        sql = "SELECT * FROM reviews WHERE job_id = ? ORDER BY id DESC"
        return [dict(r) for r in self.execute(sql, (job_id,))]

    def store_id(self) -> str:
        """A random id of this cell's history, made once: with a decision id it keys actions
        uniquely across cells (two SQLite cells both have a decision 1)."""
        sql = "SELECT value FROM meta WHERE cell = ? AND key = 'store_id'"
        row = self.execute(sql, (self.cell,)).fetchone()
        if row is not None:
            return json.loads(row[0])
        self.execute(
            "INSERT INTO meta (cell, key, value) VALUES (?, 'store_id', ?) ON CONFLICT DO NOTHING",
            (self.cell, json.dumps(uuid.uuid4().hex[:12])),
        )
        return json.loads(self.execute(sql, (self.cell,)).fetchone()[0])


def decode_map(row: LayerRow) -> np.ndarray:
    """The stored defect map of a layer row as float32 (h, w)."""
    m = np.frombuffer(row.map, dtype=np.float16).reshape(row.map_h, row.map_w)
    return m.astype(np.float32)
