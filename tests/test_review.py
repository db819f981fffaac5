"""Review decisions in the store, the review server over HTTP, and the export of labels.

The store comes from a replay of synthetic jobs through the real watcher (review_fixtures).
"""

from __future__ import annotations

import csv
import json
import signal
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
from review_fixtures import (
    HOSTILE_JOB,
    HOSTILE_NOTE,
    HOSTILE_PRINTER,
    load_shop,
    serving,
)

from inspect3d.cli import main as inspect3d_main
from inspect3d.data.manifest import MANIFEST_COLUMNS, read_manifest
from inspect3d.errors import InspectError
from inspect3d.review import decisions, shop
from inspect3d.review.dataset import export_reviews
from inspect3d.review.server import ReviewServer

from conftest import SIZE


def add(state: Path, layer_id: int, decision: str, reason: str = "", note: str = "", who="qa1"):
    store = shop.open_store(state)
    try:
        return decisions.record(store, decisions.check(layer_id, decision, reason, note, who))
    finally:
        store.close()


def flagged(state: Path) -> list[shop.Layer]:
    return [x for j in load_shop(state).jobs for x in j.flagged]


# --- decisions -------------------------------------------------------------------------------
def test_decisions_round_trip_append_only_with_history(state):
    layer = flagged(state)[0]
    first = add(state, layer.id, "unsure", "needs_expert", "ask Ana", who="bob")
    second = add(state, layer.id, "confirmed_defect", "streak", "clear streak", who="ana")
    current = {x.id: x for x in flagged(state)}[layer.id].review
    assert (current["id"], current["decision"], current["reason"]) == (
        second, "confirmed_defect", "streak"
    )  # fmt: skip
    assert current["reviewer"] == "ana" and current["supersedes"] == first
    store = shop.open_store(state)
    try:
        history = [dict(r) for r in store.review_history(layer.id)]
        assert [h["id"] for h in history] == [second, first]
        assert history[1]["note"] == "ask Ana" and history[1]["reviewer"] == "bob"
        for sql in ("UPDATE reviews SET decision = 'false_alarm'", "DELETE FROM reviews"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                store.db.execute(sql)
    finally:
        store.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((1, "defect", "", ""), "decision 'defect' is not valid: use one of ['confirmed_defect'"),
        ((1, "false_alarm", "streak", ""), "reason 'streak' is not valid for false_alarm"),
        (("x", "unsure", "", ""), "layer_id 'x' is not a layer number"),
        ((1, "unsure", "", "n" * 3000), "at most 2000"),
    ],
)
def test_bad_decisions_are_refused_with_the_valid_choices(args, message):
    with pytest.raises(InspectError, match=message.replace("[", r"\[")):
        decisions.check(*args, reviewer="qa")


def test_default_reason_is_the_first_of_the_decision():
    assert decisions.check(3, "false_alarm", "", None, "qa").reason == "lighting"


# --- the server over plain HTTP ----------------------------------------------------------------
@pytest.fixture
def server(state) -> Iterator[ReviewServer]:
    with serving(state, "tester") as srv:
        yield srv


def request(srv: ReviewServer, path: str, form: dict | None = None, host: str | None = None):
    port = srv.server_address[1]
    data = None if form is None else urlencode(form).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data)
    if host:
        req.add_header("Host", host)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_page_lists_flagged_jobs_escaped(server, state):
    status, page = request(server, "/")
    assert status == 200
    assert HOSTILE_JOB not in page and "job&lt;img src=x onerror=alert(&#39;job&#39;)&gt;" in page
    job = next(j for j in load_shop(state).jobs if j.flagged and j.printer != HOSTILE_PRINTER)
    status, page = request(server, f"/?job={job.id}")
    assert status == 200 and f'data-layer-id="{job.flagged[0].id}"' in page
    assert request(server, "/?job=999999")[0] == 400
    assert request(server, "/", host="evil.example:80")[0] == 403  # DNS rebinding


def test_post_stores_the_decision_with_reviewer_and_checks_input(server, state):
    layer = flagged(state)[0]
    good = {"token": server.token, "layer_id": layer.id, "decision": "false_alarm",
            "reason": "camera", "note": HOSTILE_NOTE}  # fmt: skip
    assert request(server, "/review", {**good, "token": "wrong"})[0] == 403
    status, body = request(server, "/review", {**good, "decision": "maybe"})
    assert status == 400 and "decision 'maybe' is not valid" in json.loads(body)["error"]
    status, body = request(server, "/review", {**good, "reason": "streak"})
    assert status == 400 and "reason 'streak' is not valid" in json.loads(body)["error"]
    status, body = request(server, "/review", good)
    assert status == 200
    reply = json.loads(body)
    assert reply["current"]["reviewer"] == "tester" and reply["current"]["note"] == HOSTILE_NOTE
    review = {x.id: x for x in flagged(state)}[layer.id].review
    assert (review["decision"], review["reason"], review["reviewer"]) == (
        "false_alarm", "camera", "tester"
    )  # fmt: skip
    page = request(server, f"/?job={review['job_id']}")[1]
    assert '<script>alert("note")' not in page and "False alarm (camera) by tester" in page


def test_off_loopback_every_request_needs_the_token(server):
    server.loopback = False  # as if bound to 0.0.0.0 (the test stays on 127.0.0.1)
    assert request(server, "/")[0] == 403
    assert request(server, f"/?token={server.token}")[0] == 200
    assert "?token=" in server.url


# --- export of labels ----------------------------------------------------------------------
def truth(state: Path, synth_dir: Path) -> dict[str, str]:
    """The synthetic label of every layer file name (the folder it came from)."""
    return {p.name: p.parent.name for p in synth_dir.glob("*/*.png") if p.parent.name[0] != "_"}


def review_all(state: Path, synth_dir: Path) -> None:
    """Decide every scored layer as a careful QA person would, from the synthetic truth."""
    labels = truth(state, synth_dir)
    for job in load_shop(state).jobs:
        for x in job.layers:
            label = labels.get(x.rel.rsplit("/", 1)[-1], "ok")
            if x.layer == 1 and job.name == "job000":
                add(state, x.id, "unsure", "image_unclear")
            elif label == "ok":
                add(state, x.id, "false_alarm", "powder_texture")
            else:
                add(state, x.id, "confirmed_defect", label)


def test_export_writes_a_manifest_train_reads(state, synth_dir, tmp_path):
    review_all(state, synth_dir)
    out = tmp_path / "labels" / "reviewed.csv"
    summary = export_reviews(state, out)
    assert summary.unsure == 1 and summary.missing == 0
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0])[: len(MANIFEST_COLUMNS)] == list(MANIFEST_COLUMNS)
    assert {"job", "layer", "printer", "decision", "reviewer", "reviewed_at"} <= set(rows[0])
    assert len(rows) == summary.rows == sum(summary.labels.values())
    labels = truth(state, synth_dir)
    for r in rows:
        assert r["label"] == labels.get(Path(r["path"]).name, "ok")
        assert r["decision"] == ("false_alarm" if r["label"] == "ok" else "confirmed_defect")
    items = read_manifest(out)  # every path resolves
    assert len(items) == len(rows) and {it.label for it in items} == set(summary.labels)
    assert str(summary).startswith(f"wrote {len(rows)} reviewed layers")


def test_export_leaves_out_gone_images_and_says_so(state, tmp_path):
    layer = flagged(state)[0]
    add(state, layer.id, "confirmed_defect", "spatter")
    con = sqlite3.connect(state / "watch.db")
    con.execute("UPDATE meta SET value = ? WHERE key = 'inbox'", (json.dumps("/nonexistent"),))
    con.commit()
    con.close()
    for p in (state / "review").rglob(Path(layer.rel).name):
        p.unlink()
    with pytest.raises(InspectError, match="1 with their image gone"):
        export_reviews(state, tmp_path / "x.csv")


def test_dataset_command_and_its_errors(state, tmp_path, capsys):
    add(state, flagged(state)[0].id, "confirmed_defect", "streak")
    out = tmp_path / "r.csv"
    assert inspect3d_main(["dataset", "from-reviews", f"state={state}", f"out={out}"]) == 0
    assert "wrote 1 reviewed layers" in capsys.readouterr().out and out.is_file()
    assert inspect3d_main(["dataset", "from-labels", f"state={state}"]) == 2
    assert "unknown dataset command 'from-labels'" in capsys.readouterr().err
    assert inspect3d_main(["review", f"state={state}", "port=abc"]) == 2
    assert "port" in capsys.readouterr().err


def test_exported_manifest_trains(state, synth_dir, tmp_path):
    """The contract: `inspect3d train data=manifest data.manifest=FILE.csv` takes the export."""
    review_all(state, synth_dir)
    out = tmp_path / "labels" / "reviewed.csv"
    export_reviews(state, out)
    run = tmp_path / "run"
    args = [
        "train", "data=manifest", f"data.manifest={out}",
        "data.normal_class=ok", f"data.height={SIZE}", f"data.width={SIZE}", "trainer=fast",
        "trainer.epochs=1", "model.width=8", "data.folds=3", f"hydra.run.dir={run}",
    ]  # fmt: skip
    r = subprocess.run(
        [sys.executable, "-m", "inspect3d.cli", *args], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "checkpoint.pt").is_file() and (run / "metrics.json").is_file()


def test_review_command_serves_on_loopback_until_interrupted(state):
    """The contract `inspect3d review state=STATE port=P`, as a user runs it (port 0: any free)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "inspect3d.cli", "review", f"state={state}", "port=0",
         "reviewer=cli-qa"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()  # the URL, printed once listening
        url = line.split(" at ", 1)[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and "reviewer cli-qa" in line
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.status == 200 and "Reviewer: <b>cli-qa</b>" in r.read().decode()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0  # generous: a loaded 2-core CI machine


def test_help_lists_every_reason_code(capsys):
    assert inspect3d_main(["review", "--help"]) == 0
    out = capsys.readouterr().out
    for codes in decisions.REASONS.values():
        assert all(f"    {code} " in out for code, _ in codes)
