"""Where a watcher's history lives: SQLite in ``STATE/watch.db`` (the default) or PostgreSQL.

``db=postgresql://USER[:PASSWORD]@HOST[:PORT]/NAME`` puts the history of every cell of a plant
in one database; files (evidence, logs, the reject log) stay in each watcher's ``state=``. The
password is used in memory only and never shown: put it in ``PGPASSFILE`` (``~/.pgpass``) or
``PGPASSWORD`` rather than on a command line. ``inspect3d db upgrade`` brings a database's
schema to this version; ``inspect3d db copy`` moves a cell's SQLite history into PostgreSQL.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from inspect3d.errors import InspectError
from inspect3d.watch.store import Store

DB_NAME = "watch.db"
URL_FORM = "postgresql://USER@HOST:PORT/NAME"
COPIED = ("jobs", "layers", "decisions", "actions", "errors", "reviews")


def shown_url(url: str) -> str:
    """``url`` as it may be shown: the password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def check_url(url: object) -> str:
    """A PostgreSQL URL, checked; InspectError names the value (shown without password)."""
    text = str(url)
    parts = urlsplit(text)
    if parts.scheme not in ("postgresql", "postgres") or not parts.path.strip("/"):
        raise InspectError(
            f"db={shown_url(text)!r} is not a PostgreSQL URL: use db={URL_FORM} "
            "(password in PGPASSFILE or PGPASSWORD), or leave db out for SQLite in state="
        )
    try:
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        raise InspectError(
            f"db={shown_url(text)!r}: the port is not a number ({URL_FORM})"
        ) from None
    return text


def open_store(
    state: str | Path | None = None, db: str | None = None, cell: str | None = None,
    create: bool = False,
) -> Store:  # fmt: skip
    """The store of a state folder (SQLite) or of ``db`` (PostgreSQL), to read or write.

    ``cell`` (PostgreSQL): the cell to read or write; None reads the whole plant. ``create``:
    make an SQLite file that is not there yet (the watcher); readers never create one.
    """
    if db is None:
        return _sqlite(state, cell, create)
    url = check_url(db)
    # psycopg is an extra: imported only when a database URL asks for it
    if importlib.util.find_spec("psycopg") is None:
        raise InspectError(
            f'db={shown_url(url)!r} needs the PostgreSQL extra: pip install "inspect3d[postgres]"'
        )
    from inspect3d.watch.store_pg import PgStore

    folder = None if state is None else Path(state).expanduser()
    return PgStore(url, shown_url(url), cell or None, folder)


def _sqlite(state: str | Path | None, cell: str | None, create: bool) -> Store:
    if state is None:
        raise InspectError(f"no state folder given: use state=STATE (SQLite) or db={URL_FORM}")
    if cell and not create:
        raise InspectError(
            f"cell={cell!r} reads one cell of a plant database: give db={URL_FORM} too "
            "(an SQLite state folder holds one cell)"
        )
    path = Path(state).expanduser() / DB_NAME
    if not create and not path.is_file():
        raise InspectError(
            f"no watcher state in {str(state)!r}: {path} does not exist "
            "(give the state= folder of `inspect3d watch`, or its db=)"
        )
    return Store(path)


# --- copying a cell's SQLite history into PostgreSQL ---------------------------------------------
def copy_cell(state: str | Path, db: str, cell: str | None = None) -> dict[str, int]:
    """Copy the SQLite history of ``state`` into ``db`` as ``cell`` (default: the cell name the
    watcher recorded, else the state folder's name), in one transaction, checked row for row.

    Rows get new ids; what refers to them follows (jobs, layers, decisions, reviews). Each
    decision's record keeps the id it was logged and keyed with, and the database's decision ids
    are moved past it, so a later decision never repeats one. Returns rows copied per table.
    """
    src = open_store(state)
    try:
        cell = cell or _recorded_cell(src) or Path(state).expanduser().resolve().name
        dst = open_store(state, db, cell)
        try:
            with dst.transaction():
                counts = _copy(src, dst)
                if history(src) != history(dst):
                    raise InspectError(f"the copy of {str(state)!r} differs from it: not copied")
        finally:
            dst.close()
    finally:
        src.close()
    return counts


def _recorded_cell(store: Store) -> str | None:
    value = store.meta().get("cell")
    return json.loads(value) if value else None


def _copy(src: Store, dst: Store) -> dict[str, int]:
    if dst.scalar("SELECT COUNT(*) FROM jobs WHERE cell = ?", (dst.cell,)) or dst.meta():
        raise InspectError(
            f"cell {dst.cell!r} already has history in {dst.where}: copy into a new cell=NAME"
        )
    ids: dict[str, dict[int, int]] = {t: {None: None} for t in COPIED}
    refs = {"job_id": "jobs", "layer_id": "layers", "decision_id": "decisions",
            "supersedes": "reviews"}  # fmt: skip
    counts = {}
    for table in COPIED:
        rows = src.table_rows(table)
        for row in rows:
            old = row.pop("id")
            row = {k: ids[refs[k]][v] if k in refs else v for k, v in row.items()}
            if "cell" in row:
                row["cell"] = dst.cell
            ids[table][old] = dst.insert_row(table, row)
        counts[table] = len(rows)
    for row in src.table_rows("printers"):
        dst.insert_row("printers", {**row, "cell": dst.cell,
                                    "current_job": ids["jobs"].get(row["current_job"])},
                       returning=None)  # fmt: skip
    for row in src.table_rows("meta"):
        dst.insert_row("meta", {**row, "cell": dst.cell}, returning=None)
    dst.set_meta(cell=dst.cell)
    logged = [json.loads(r["record"]).get("decision_id") or 0 for r in src.table_rows("decisions")]
    dst.move_ids_past("decisions", max(logged, default=0))
    return counts


def history(store: Store) -> dict:
    """A cell's whole history without row ids (what refers to a row names it instead)."""
    jobs = {j.id: (j.printer, j.name) for j in store.jobs()}
    layers = {}
    out: dict = {"jobs": {}, "meta": store.meta()}
    out["meta"].pop("cell", None)
    for job in store.jobs():
        rows = store.job_layers(job.id)
        layers.update({r.id: r.rel for r in rows})
        out["jobs"][jobs[job.id]] = {
            "job": {**vars(job), "id": None, "cell": None},
            "layers": [{**vars(r), "id": None, "job_id": None, "cell": None} for r in rows],
            "decisions": [
                {**vars(d), "id": None, "job_id": None} for d in store.job_decisions(job.id)
            ],  # fmt: skip
        }
    reviews = sorted(store.current_reviews().values(), key=lambda r: r["id"])
    out["reviews"] = [
        [{**r, "id": None, "supersedes": None, "layer_id": layers[r["layer_id"]],
          "job_id": jobs[r["job_id"]]} for r in store.review_history(c["layer_id"])]
        for c in reviews
    ]  # fmt: skip
    out["totals"] = store.totals()
    return out


# --- ``inspect3d db upgrade|copy`` ---------------------------------------------------------------
USAGE = (
    f"inspect3d db upgrade db={URL_FORM}   (or state=DIR for an SQLite state folder)\n"
    f"inspect3d db copy state=DIR db={URL_FORM} [cell=NAME]"
)


def main(argv: list[str]) -> int:
    """``inspect3d db upgrade|copy key=value...``."""
    parser = argparse.ArgumentParser(prog="inspect3d db", usage=USAGE, description=__doc__)
    parser.add_argument("command", choices=("upgrade", "copy"))
    parser.add_argument("settings", nargs="*", help="key=value: db=URL, state=DIR, cell=NAME")
    args = parser.parse_args(argv)
    kv = _settings(args.settings, {"db", "state", "cell"})
    if args.command == "upgrade":
        store = open_store(kv.get("state"), kv.get("db"), create=False)
        try:
            print(f"{store.where}: schema version {store.version()}")
        finally:
            store.close()
        return 0
    if "state" not in kv or "db" not in kv:
        raise InspectError(f"db copy needs state= and db=: {USAGE.splitlines()[1]}")
    counts = copy_cell(kv["state"], kv["db"], kv.get("cell"))
    shown = ", ".join(f"{n} {t}" for t, n in counts.items())
    print(f"copied {kv['state']} into {shown_url(kv['db'])}: {shown}")
    return 0


def _settings(items: list[str], valid: set[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in valid:
            raise InspectError(f"unexpected argument {item!r}: use key=value with {sorted(valid)}")
        out[key] = value
    return out
