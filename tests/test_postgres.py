"""The plant database: many watchers, one PostgreSQL history and one QA queue, on a real server.

A throwaway cluster (``tests/pgcluster.py``) runs for the session; each test gets a new
database. Its TCP logins need a password, so every URL here carries one: it must never show.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from test_watch import layer_images, make_cfg, put

from inspect3d.cli import main as inspect3d_main
from inspect3d.errors import InspectError
from inspect3d.review import decisions, shop
from inspect3d.review.dataset import export_reviews
from inspect3d.review.report import build_report
from inspect3d.review.server import ReviewServer
from inspect3d.watch.config import WatchConfig
from inspect3d.watch.db import copy_cell, open_store, shown_url
from inspect3d.watch.service import Watcher
from inspect3d.watch.status import jobs, summary
from inspect3d.watch.store import SCHEMA_VERSION, SQLITE_SCHEMA_V1

from pgcluster import PASSWORD, require_psycopg

psycopg = require_psycopg()


def plant_cfg(root: Path, model: Path, url: str, cell: str, **kw) -> WatchConfig:
    return make_cfg(root / cell, model, db=url, cell=cell, **kw)


def fill(cfg: WatchConfig, synth_dir: Path, jobs_: int = 2, layers: int = 3) -> list[Path]:
    images = layer_images(synth_dir, layers)
    return [
        put(cfg, "p1", f"j{j}", f"layer_{i + 1:04d}.png", img)
        for j in range(jobs_)
        for i, img in enumerate(images)
    ]


def run_until_drained(w: Watcher, expected: int, limit_s: float = 120) -> None:
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        w.step()
        if w.store.scalar("SELECT COUNT(*) FROM layers WHERE cell = ?", (w.cfg.cell,)) >= expected:
            return
    raise AssertionError(f"{w.cfg.cell}: not drained in {limit_s} s")


# --- the store on PostgreSQL -------------------------------------------------------------------
def test_urls_are_checked_and_never_shown_with_their_password():
    with pytest.raises(InspectError, match=r"not a PostgreSQL URL: use db=postgresql://USER@HOST"):
        open_store(None, "mysql://u:secret@h/db")
    with pytest.raises(InspectError, match="port is not a number") as err:
        open_store(None, "postgresql://u:secret@h:x/db")
    assert "secret" not in str(err.value)
    assert shown_url("postgresql://u:secret@h:5/db") == "postgresql://u:***@h:5/db"
    assert shown_url("postgresql://u@h/db") == "postgresql://u@h/db"
    with pytest.raises(InspectError, match="needs cell=NAME"):
        WatchConfig(model="m", inbox="i", state="s", db="postgresql://u@h/db")
    assert "secret" not in repr(
        WatchConfig(model="m", inbox="i", state="s", db="postgresql://u:secret@h/d", cell="c")
    )


def test_an_sqlite_file_of_schema_1_is_upgraded_in_place(tmp_path):
    con = sqlite3.connect(tmp_path / "watch.db")
    con.executescript(SQLITE_SCHEMA_V1)
    con.execute("INSERT INTO jobs (printer, name, status) VALUES ('p1', 'j1', 'closed')")
    con.execute("INSERT INTO layers (job_id, rel, status) VALUES (1, 'p1/j1/a.png', 'scored')")
    con.execute("INSERT INTO meta (key, value) VALUES ('heartbeat', '1.5')")
    con.commit()
    con.close()
    cmd = [sys.executable, "-m", "inspect3d.cli", "db", "upgrade", f"state={tmp_path}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and f"schema version {SCHEMA_VERSION}" in r.stdout, r.stderr
    store = open_store(tmp_path)
    try:
        assert store.version() == SCHEMA_VERSION
        assert [(j.printer, j.cell) for j in store.jobs()] == [("p1", "")]
        assert store.known_rels() == {"p1/j1/a.png"} and store.meta() == {"heartbeat": "1.5"}
    finally:
        store.close()


def test_schema_version_upgrade_and_reviews_refuse_update_and_delete(pg_url):
    store = open_store(None, pg_url, "c1")
    try:
        assert store.version() == SCHEMA_VERSION and store.upgrade() == SCHEMA_VERSION
        with store.transaction():
            job = store.open_job("p1", "j1", 1.0)
            row = {"cell": "c1", "job_id": job, "rel": "p1/j1/a.png", "status": "scored"}
            layer = store.insert_row("layers", {**row, "layer": 2**63 - 1})
        first = decisions.record(store, decisions.check(layer, "unsure", "", "", "ana"))
        for sql in ("UPDATE reviews SET decision = 'false_alarm'", "DELETE FROM reviews",
                    "TRUNCATE reviews"):  # fmt: skip
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                store.execute(sql)
        assert [r["id"] for r in store.review_history(layer)] == [first]
        with pytest.raises(psycopg.errors.UniqueViolation):  # a layer is known once per cell
            store.insert_row("layers", {"cell": "c1", "job_id": job, "rel": "p1/j1/a.png",
                                        "status": "scored"})  # fmt: skip
        store.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    finally:
        store.close()
    with pytest.raises(InspectError, match=f"schema version {SCHEMA_VERSION + 1}, newer") as err:
        open_store(None, pg_url, "c1")
    assert PASSWORD not in str(err.value)


def test_a_cell_has_one_writer_and_a_dead_server_is_named(pg_cluster, pg_url, monkeypatch):
    monkeypatch.setenv("PGPASSWORD", PASSWORD)  # the password from the environment, not the URL
    a = open_store(None, pg_url.replace(f":{PASSWORD}@", "@"), "c1")
    try:
        a.hold_cell()
        b = open_store(None, pg_url, "c1")
        with pytest.raises(InspectError, match="another watcher already writes cell 'c1'"):
            b.hold_cell()
        b.close()
    finally:
        a.close()
    dead = pg_url.replace(f":{pg_cluster.port}/", f":{pg_cluster.port + 1}/")  # nothing there
    with pytest.raises(InspectError, match="cannot connect to postgresql://inspect3d:\\*\\*\\*@"):
        open_store(None, dead, "c1")


# --- many watchers, one history, one QA queue ---------------------------------------------------
def test_watchers_of_two_cells_write_one_database_and_qa_sees_the_plant(
    pg_url, exported, synth_dir, tmp_path, capsys
):
    cfgs = [plant_cfg(tmp_path, exported, pg_url, cell) for cell in ("east", "west")]
    files = {c.cell: fill(c, synth_dir) for c in cfgs}  # both cells have a printer p1, job j0
    watchers = [Watcher(c).start() for c in cfgs]
    try:
        threads = [threading.Thread(target=run_until_drained, args=(w, 6)) for w in watchers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for w in watchers:
            w.close()
    plant = summary(None, pg_url)
    assert plant["layers_scored"] == 12 and plant["jobs"] == 4
    assert set(plant["printers"]) == {"east/p1", "west/p1"} and set(plant["cells"]) == {
        "east",
        "west",
    }
    east = summary(None, pg_url, "east")
    assert east["layers_scored"] == 6 and set(east["printers"]) == {"east/p1"}
    assert east["health"]["cell"] == "east" and not east["health"]["running"]
    assert sorted(j["cell"] for j in jobs(None, pg_url)) == ["east", "east", "west", "west"]
    store = open_store(None, pg_url)
    try:  # every file once, with its own cell's job
        for cell, paths in files.items():
            rels = [r[0] for r in store.execute("SELECT rel FROM layers WHERE cell = ?", (cell,))]
            assert sorted(rels) == sorted(
                str(p.relative_to(tmp_path / cell / "inbox")) for p in paths
            )
        s = shop.load(store)
    finally:
        store.close()
    assert {j.cell for j in s.jobs if j.flagged} == {"east", "west"}  # one queue for the plant
    assert all(x.image is not None for j in s.jobs for x in j.flagged)  # each cell's files found
    index = build_report(None, tmp_path / "report", db=pg_url)
    html = index.read_text()
    assert "east/p1" in html and "west/p1" in html and PASSWORD not in html
    only_west = build_report(None, tmp_path / "west-report", db=pg_url, cell="west").read_text()
    assert "west/p1" in only_west and "east/p1" not in only_west
    two_reviewers_on_one_layer(pg_url, s)
    review_page_on_all_addresses_needs_its_token(pg_url)
    out = export_reviews(None, tmp_path / "reviewed.csv", db=pg_url)
    assert out.rows == 1
    assert inspect3d_main(["status", f"db={pg_url}", "cell=west", "--jobs"]) == 0
    text = capsys.readouterr().out
    assert "west/p1" in text and "east/p1" not in text and PASSWORD not in text
    assert inspect3d_main(["status", f"db={pg_url}"]) == 0
    text = capsys.readouterr().out
    assert "health east: not running" in text and "health west: not running" in text


def two_reviewers_on_one_layer(url: str, s: shop.Shop) -> None:
    layer = next(x for j in s.jobs for x in j.flagged)
    ids, barrier = [], threading.Barrier(2)

    def review(who: str, decision: str) -> None:
        store = open_store(None, url)
        try:
            barrier.wait()
            ids.append(decisions.record(store, decisions.check(layer.id, decision, "", "", who)))
        finally:
            store.close()

    threads = [threading.Thread(target=review, args=a) for a in
               (("ana", "confirmed_defect"), ("bob", "unsure"))]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store = open_store(None, url)
    try:
        history = store.review_history(layer.id)
    finally:
        store.close()
    assert {h["reviewer"] for h in history} == {"ana", "bob"} and sorted(ids) == [
        h["id"] for h in reversed(history)
    ]
    assert history[0]["supersedes"] == history[1]["id"]  # serialised: the later one supersedes
    if history[0]["decision"] == "unsure":  # leave one confirmed defect for the export
        store = open_store(None, url)
        try:
            decisions.record(store, decisions.check(layer.id, "confirmed_defect", "", "", "ana"))
        finally:
            store.close()


def review_page_on_all_addresses_needs_its_token(url: str) -> None:
    server = ReviewServer(shop.Source(db=url), "0.0.0.0", 0, None, "qa")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base, timeout=30)
        assert err.value.code == 403
        with urllib.request.urlopen(server.url, timeout=30) as r:
            page = r.read().decode()
        assert r.status == 200 and "east" in page and PASSWORD not in page
    finally:
        server.shutdown()
        server.server_close()


# --- kill -9 and a server restart while a watcher runs -------------------------------------------
def watch_cmd(cfg: WatchConfig) -> list[str]:
    return [
        sys.executable, "-m", "inspect3d.cli", "watch", f"model={cfg.model}", f"inbox={cfg.inbox}",
        f"state={cfg.state}", f"db={cfg.db}", f"cell={cfg.cell}", "settle_s=0.05", "poll_s=0.05",
        "policy.k=2", "policy.n=3", "policy.threshold=0.0", "idle_s=3600",
    ]  # fmt: skip


def layers_in(url: str, cell: str) -> int:
    with psycopg.connect(url) as con:
        return con.execute("SELECT COUNT(*) FROM layers WHERE cell = %s", (cell,)).fetchone()[0]


def wait_for(check, limit_s: float = 120) -> bool:
    end = time.monotonic() + limit_s
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(0.1)
    return True


def test_kill_9_and_a_server_restart_lose_nothing_and_repeat_nothing(
    pg_cluster, pg_url, exported, synth_dir, tmp_path
):
    cfg = plant_cfg(tmp_path, exported, pg_url, "c1")
    images = layer_images(synth_dir, 6)
    written = []

    def put_job(j: int) -> None:
        for i, img in enumerate(images):
            written.append(put(cfg, "p1", f"j{j}", f"layer_{i + 1:04d}.png", img))
            time.sleep(0.05)
        (Path(cfg.inbox) / "p1" / f"j{j}" / "JOB_END").touch()

    Path(cfg.inbox).mkdir(parents=True)
    open_store(None, pg_url, "c1").close()  # the schema, for the counts below
    cmd = watch_cmd(cfg)
    for j in range(2):  # a watcher killed -9 twice while layers arrive
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        put_job(j)
        n = len(written)
        assert wait_for(lambda n=n: layers_in(pg_url, "c1") >= n - 3)
        proc.kill()
        proc.wait()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: layers_in(pg_url, "c1") == len(written) and started(pg_url, proc))
        pg_cluster.stop()  # the server goes away while the watcher runs
        threading.Thread(target=put_job, args=(2,)).start()
        time.sleep(2.0)
        pg_cluster.start()
        done = wait_for(
            lambda: layers_in(pg_url, "c1") == len(written) and final_count(pg_url) == 3
        )
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert done and proc.returncode == 0, err[-3000:]
    check_once(pg_url, cfg, written)
    s = summary(cfg.state, pg_url, "c1")
    assert "unreachable for" in json.dumps(s["health"]["last_error"] or "") or any(
        "unreachable for" in m for m in error_messages(pg_url)
    )
    text = (Path(cfg.state) / "watch.log").read_text() + json.dumps(s) + err
    assert "unreachable for" in text and PASSWORD not in text
    assert "postgresql://inspect3d:***@" in text


def started(url: str, proc: subprocess.Popen) -> bool:
    """The watcher ``proc`` has started: its pid is in its cell's health."""
    with psycopg.connect(url) as con:
        sql = "SELECT value FROM meta WHERE cell = 'c1' AND key = 'pid'"
        row = con.execute(sql).fetchone()
    return row is not None and json.loads(row[0]) == proc.pid


def final_count(url: str) -> int:
    with psycopg.connect(url) as con:
        return con.execute("SELECT COUNT(*) FROM decisions WHERE kind = 'FINAL'").fetchone()[0]


def error_messages(url: str) -> list[str]:
    with psycopg.connect(url) as con:
        return [r[0] for r in con.execute("SELECT message FROM errors")]


def check_once(url: str, cfg: WatchConfig, written: list[Path]) -> None:
    """Each file scored once, each job decided once, each decision logged once."""
    store = open_store(None, url, cfg.cell)
    try:
        rels = [r[0] for r in store.execute("SELECT rel FROM layers")]
        assert sorted(rels) == sorted(str(p.relative_to(cfg.inbox)) for p in written)
        assert all(r.status == "scored" for j in store.jobs() for r in store.job_layers(j.id))
        kinds = [(d.job_id, d.kind) for j in store.jobs() for d in store.job_decisions(j.id)]
        assert len(kinds) == len(set(kinds)) and sum(k == "FINAL" for _, k in kinds) == 3
        lines = (Path(cfg.state) / "rejects.jsonl").read_text().splitlines()
        logged = [json.loads(x)["decision_id"] for x in lines]
        ids = [r[0] for r in store.execute("SELECT id FROM decisions")]
        assert sorted(logged) == sorted(ids)
    finally:
        store.close()


# --- a cell's SQLite history moved into PostgreSQL ----------------------------------------------
def test_db_copy_moves_a_cells_sqlite_history_exactly(pg_url, exported, synth_dir, tmp_path):
    cfg = make_cfg(tmp_path, exported)
    fill(cfg, synth_dir)
    w = Watcher(cfg).start()
    try:
        for _ in range(20):
            if not w.step():
                break
        w.book.end_jobs([], time.time() + 7200)  # idle: final verdicts
        w.outbox.flush()
        layer = w.store.job_layers(w.store.jobs()[0].id)[0].id
        decisions.record(w.store, decisions.check(layer, "unsure", "", "first look", "ana"))
        decisions.record(w.store, decisions.check(layer, "false_alarm", "", "", "bob"))
    finally:
        w.close()
    r = subprocess.run(
        [sys.executable, "-m", "inspect3d.cli", "db", "copy", f"state={cfg.state}", f"db={pg_url}",
         "cell=hall1"], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert PASSWORD not in r.stdout + r.stderr and "6 layers" in r.stdout
    src, dst = open_store(cfg.state), open_store(None, pg_url, "hall1")
    try:
        assert same_history(src, dst)
        assert src.totals() == dst.totals() and src.totals()["layers_scored"] == 6
        logged = max(d.record["decision_id"] for j in dst.jobs() for d in dst.job_decisions(j.id))
        with dst.transaction():  # a new decision never repeats a logged decision id
            job = dst.open_job("p9", "new", time.time())
            assert dst.add_decision(job, "WARN", "WARN", {}, time.time()) > logged
    finally:
        src.close()
        dst.close()
    with pytest.raises(InspectError, match="cell 'hall1' already has history"):
        copy_cell(cfg.state, pg_url, "hall1")
    r = subprocess.run([sys.executable, "-m", "inspect3d.cli", "db", "upgrade", f"db={pg_url}"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0 and f"schema version {SCHEMA_VERSION}" in r.stdout, r.stderr
    assert PASSWORD not in r.stdout and "***" in r.stdout


def same_history(a, b) -> bool:
    """Every job, layer (score, map, times), decision (record as logged) and review, compared
    field by field with row ids replaced by what they name."""
    ja, jb = a.jobs(), b.jobs()
    assert [replace(j, id=0, cell="") for j in ja] == [replace(j, id=0, cell="") for j in jb]
    for x, y in zip(ja, jb, strict=True):
        la, lb = a.job_layers(x.id), b.job_layers(y.id)
        assert [replace(r, id=0, job_id=0, cell="") for r in la] == [
            replace(r, id=0, job_id=0, cell="") for r in lb
        ]
        assert [replace(d, id=0, job_id=0) for d in a.job_decisions(x.id)] == [
            replace(d, id=0, job_id=0) for d in b.job_decisions(y.id)
        ]
        for ra, rb in zip(la, lb, strict=True):
            ha, hb = a.review_history(ra.id), b.review_history(rb.id)
            strip = ("id", "layer_id", "job_id", "supersedes")
            assert [{k: v for k, v in h.items() if k not in strip} for h in ha] == [
                {k: v for k, v in h.items() if k not in strip} for h in hb
            ]
            assert [h["supersedes"] is None for h in ha] == [h["supersedes"] is None for h in hb]
    ma, mb = a.meta(), b.meta()
    assert {k: v for k, v in ma.items() if k != "cell"} == {
        k: v for k, v in mb.items() if k != "cell"
    }
    return True
