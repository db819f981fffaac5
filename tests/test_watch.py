"""The watcher service on a real model and a real SQLite store: flow, restart, faults, actions.

Most tests drive ``Watcher.step()`` directly with ``settle_s=0`` (no sleeping, deterministic);
the CLI tests run the real commands in subprocesses.
"""

from __future__ import annotations

import errno
import http.server
import json
import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from inspect3d.errors import InspectError
from inspect3d.infer.model import OnnxModel
from inspect3d.watch import journal, scoring
from inspect3d.watch.config import ActionConfig, WatchConfig
from inspect3d.watch.policy import PolicyConfig
from inspect3d.watch.service import Watcher
from inspect3d.watch.status import jobs, summary


def layer_images(synth_dir: Path, n: int) -> list[Path]:
    return sorted((synth_dir / "ok").glob("*.png"))[:n]


def make_cfg(tmp_path: Path, model_path: Path, **kw) -> WatchConfig:
    policy = kw.pop("policy", PolicyConfig(k=2, n=3, threshold=0.0))  # every layer "bad"
    # incomplete_s=0: a cut-short file is failed on the next step, not after waiting for more
    base = dict(settle_s=0.0, poll_s=0.01, idle_s=3600.0, batch_size=8, review=True)
    base.update(incomplete_s=0.0)
    base.update(model=str(model_path), inbox=str(tmp_path / "inbox"), state=str(tmp_path / "state"))
    base.update(kw)
    return WatchConfig(policy=policy, **base)


def put(cfg: WatchConfig, printer: str, job: str, name: str, src: Path | bytes) -> Path:
    dest = Path(cfg.inbox) / printer / job / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(src, bytes):
        dest.write_bytes(src)
    else:
        shutil.copyfile(src, dest)
    return dest


def drain(w: Watcher, limit: int = 50) -> None:
    for _ in range(limit):
        if not w.step():
            return


def db(cfg: WatchConfig) -> sqlite3.Connection:
    con = sqlite3.connect(Path(cfg.state) / "watch.db")
    con.row_factory = sqlite3.Row
    return con


def layer_row(cfg: WatchConfig, name: str) -> sqlite3.Row:
    rows = db(cfg).execute("SELECT * FROM layers WHERE rel LIKE ?", (f"%/{name}",)).fetchall()
    assert len(rows) == 1, [dict(r) for r in rows]
    return rows[0]


# --- the main flow ----------------------------------------------------------------------------
def test_layers_are_scored_jobs_decided_and_ended_with_evidence(watcher, synth_dir):
    w = watcher()
    imgs = layer_images(synth_dir, 6)
    for i, src in enumerate(imgs[:3]):
        put(w.cfg, "p1", "jobA", f"layer_{i:04d}.png", src)
        put(w.cfg, "p2", "jobB", f"layer_{i:04d}.png", src)
    drain(w)
    s = summary(w.state)
    assert s["layers_scored"] == 6 and s["layers_failed"] == 0 and s["jobs"] == 2
    assert s["printers"]["p1"]["decision"] == "REJECT" and not s["printers"]["p1"]["final"]
    put(w.cfg, "p1", "jobA", "JOB_END", b"")  # marker ends jobA
    put(w.cfg, "p2", "jobC", "layer_0000.png", imgs[4])  # a new job ends jobB
    drain(w)
    verdicts = {(j["job"], j["ended_by"]): j["verdict"] for j in jobs(w.state)}
    assert verdicts == {
        ("jobA", "marker"): "REJECT",
        ("jobB", "next_job"): "REJECT",
        ("jobC", None): "WARN",
    }
    records = [json.loads(x) for x in (w.state / "rejects.jsonl").read_text().splitlines()]
    kinds = sorted((r["job"], r["kind"]) for r in records)
    done = [(j, k) for j in ("jobA", "jobB") for k in ("WARN", "REJECT", "FINAL")]
    assert kinds == sorted([*done, ("jobC", "WARN")])
    reject = next(r for r in records if r["kind"] == "REJECT" and r["job"] == "jobA")
    assert reject["reason"]["first_bad_layer"] == 0 and reject["reason"]["layers"] == [0, 1]
    assert reject["model"]["sha256"] == w.model_sha and reject["policy"].startswith("kofn")
    review = w.state / "review" / "p1" / "jobA"
    assert (review / "layer_0000.png").is_file() and (review / "layer_0000.overlay.png").is_file()


def test_idle_jobs_end_with_a_final_verdict(watcher, synth_dir):
    w = watcher(idle_s=60.0, policy=PolicyConfig(threshold=1.01))  # nothing is bad
    put(w.cfg, "p1", "j", "layer_0001.png", layer_images(synth_dir, 1)[0])
    drain(w)
    w.step(now=time.time() + 30)
    assert jobs(w.state)[0]["final"] is False
    w.step(now=time.time() + 61)
    (job,) = jobs(w.state)
    assert (job["final"], job["verdict"], job["ended_by"]) == (True, "OK", "idle")


def test_scores_match_bare_model_and_batches_mix_printers(watcher, synth_dir):
    w = watcher(batch_size=16)
    imgs = layer_images(synth_dir, 4)
    for p in ("p1", "p2"):
        for i, src in enumerate(imgs):
            put(w.cfg, p, "j", f"layer_{i:04d}.png", src)
    assert w.step() is True
    bare = w.model.predict_batch(imgs)
    rows = db(w.cfg).execute("SELECT rel, score FROM layers WHERE rel LIKE 'p2/%' ORDER BY layer")
    got = [r["score"] for r in rows]
    assert np.allclose(got, [s.defect_score for s in bare], atol=1e-5)
    assert summary(w.state)["layers_scored"] == 8  # both printers in one step
    assert summary(w.state)["health"]["running"] is True
    w.close()
    assert summary(w.state)["health"]["running"] is False


def test_a_backlog_is_scored_batch_by_batch_after_one_poll(watcher, synth_dir):
    w = watcher(batch_size=2)
    imgs = layer_images(synth_dir, 7)
    for i, src in enumerate(imgs):
        put(w.cfg, "p1", "j", f"layer_{i:04d}.png", src)
    put(w.cfg, "p1", "j", "JOB_END", b"")
    polls, batches = [], []
    poll, score = w.scanner.poll, w.model.score_inputs
    w.scanner.poll = lambda *a, **k: polls.append(1) or poll(*a, **k)
    w.model.score_inputs = lambda x, *a: batches.append(len(x)) or score(x, *a)
    assert w.step() is True
    assert (len(polls), batches) == (1, [2, 2, 2, 1])  # 4 inference calls, one inbox walk
    rows = db(w.cfg).execute("SELECT score FROM layers ORDER BY layer").fetchall()
    bare = w.model.predict_batch(imgs)
    assert np.allclose([r["score"] for r in rows], [s.defect_score for s in bare], atol=1e-5)
    (job,) = jobs(w.state)
    assert (job["final"], job["ended_by"]) == (True, "marker")  # all its layers were in


def test_a_job_ended_by_the_next_one_in_the_same_batch_keeps_its_level(watcher, synth_dir):
    w = watcher(batch_size=8)
    imgs = layer_images(synth_dir, 4)
    for i, src in enumerate(imgs[:3]):
        old = time.time() - 60
        os.utime(put(w.cfg, "p1", "jobA", f"layer_{i:04d}.png", src), (old, old))
    put(w.cfg, "p1", "jobB", "layer_0000.png", imgs[3])  # newer: after jobA's layers
    assert w.step() is True  # all four layers in one batch: jobB's first layer ends jobA
    rows = {r["name"]: r for r in db(w.cfg).execute("SELECT * FROM jobs")}
    done = db(w.cfg).execute("SELECT MAX(done_at) FROM layers").fetchone()[0]
    assert (rows["jobA"]["status"], rows["jobA"]["level"]) == ("closed", "REJECT")
    assert (rows["jobB"]["status"], rows["jobB"]["level"]) == ("open", "WARN")
    assert rows["jobA"]["last_at"] == rows["jobB"]["last_at"] == done
    verdicts = {(j["job"], j["ended_by"]): j["verdict"] for j in jobs(w.state)}
    assert verdicts == {("jobA", "next_job"): "REJECT", ("jobB", None): "WARN"}


def test_a_stop_request_ends_a_step_after_the_batch_in_hand(watcher, synth_dir):
    w = watcher(batch_size=2)
    for i, src in enumerate(layer_images(synth_dir, 6)):
        put(w.cfg, "p1", "j", f"layer_{i:04d}.png", src)
    put(w.cfg, "p1", "j", "JOB_END", b"")
    record = w.book.record
    w.book.record = lambda results: (record(results), w.stop_requested.set())
    w.step()
    assert summary(w.state)["layers_scored"] == 2 and jobs(w.state)[0]["final"] is False
    w.stop_requested.clear()
    w.book.record = record
    drain(w)
    rels = [r[0] for r in db(w.cfg).execute("SELECT rel FROM layers")]
    assert sorted(rels) == [f"p1/j/layer_{i:04d}.png" for i in range(6)]  # each once
    assert jobs(w.state)[0]["ended_by"] == "marker"


def test_restart_resumes_without_rescoring_or_repeating_decisions(tmp_path, exported, synth_dir):
    cfg = make_cfg(tmp_path, exported)
    imgs = layer_images(synth_dir, 6)
    for i, src in enumerate(imgs[:3]):
        put(cfg, "p1", "j", f"layer_{i:04d}.png", src)
    w = Watcher(cfg).start()
    drain(w)
    w.close()
    before = [dict(r) for r in db(cfg).execute("SELECT * FROM decisions ORDER BY id")]
    for i, src in enumerate(imgs[3:], start=3):
        put(cfg, "p1", "j", f"layer_{i:04d}.png", src)
    put(cfg, "p1", "j", "JOB_END", b"")
    w = Watcher(cfg).start()
    drain(w)
    w.close()
    after = [dict(r) for r in db(cfg).execute("SELECT * FROM decisions ORDER BY id")]
    assert after[: len(before)] == before  # nothing changed
    assert [(d["kind"], d["level"]) for d in after] == [
        ("WARN", "WARN"),
        ("REJECT", "REJECT"),
        ("FINAL", "REJECT"),
    ]
    n = db(cfg).execute("SELECT COUNT(*), COUNT(DISTINCT rel) FROM layers").fetchone()
    assert tuple(n) == (6, 6)
    lines = (Path(cfg.state) / "rejects.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["decision_id"] for x in lines) == [1, 2, 3]


# --- bad input and faults: each recorded on the layer, the watcher goes on ---------------------
def png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    head = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return b"\x89PNG\r\n\x1a\n" + head + b"\x00" * 64


def test_bad_files_are_failed_with_their_reason_and_good_ones_still_scored(watcher, synth_dir):
    w = watcher(max_pixels=10_000_000)
    src = layer_images(synth_dir, 1)[0]
    data = src.read_bytes()
    outside = w.state.parent / "outside.png"
    shutil.copyfile(src, outside)
    put(w.cfg, "p1", "j", "layer_0001.png", data[: len(data) // 2])
    put(w.cfg, "p1", "j", "layer_0002.png", b"")
    put(w.cfg, "p1", "j", "layer_0003.txt", b"hello")
    put(w.cfg, "p1", "j", "layer_0004.png", png_header_only(20000, 20000))
    link = Path(w.cfg.inbox) / "p1" / "j" / "layer_0005.png"
    link.symlink_to(outside)
    put(w.cfg, "p1", "j", "bad\nname 0006.png", src)
    put(w.cfg, "p1", "j", "layer_0007.png", src)
    drain(w)
    reasons = {
        "layer_0001.png": "cannot decode",
        "layer_0002.png": "0 bytes",
        "layer_0003.txt": "is not an image",
        "layer_0004.png": "20000x20000 pixels, above max_pixels",
        "layer_0005.png": "symlink pointing out of the inbox",
        "bad\nname 0006.png": "control characters",
    }
    for name, why in reasons.items():
        row = layer_row(w.cfg, name)
        assert row["status"] == "failed" and why in row["error"], (name, row["error"])
    assert layer_row(w.cfg, "layer_0007.png")["status"] == "scored"
    s = summary(w.state)
    assert (s["layers_failed"], s["layers_scored"]) == (6, 1)


def test_16_bit_colour_and_odd_names_are_converted_and_noted(watcher, synth_dir):
    w = watcher()
    grey = cv2.imread(str(layer_images(synth_dir, 1)[0]), cv2.IMREAD_GRAYSCALE)
    ok16, png16 = cv2.imencode(".png", grey.astype(np.uint16) * 257)
    okc, pngc = cv2.imencode(".png", np.dstack([grey, grey // 2, grey]))
    assert ok16 and okc
    put(w.cfg, "p1", "j", "layer_0001.png", png16.tobytes())
    put(w.cfg, "p1", "j", "layer_0002.png", pngc.tobytes())
    put(w.cfg, "p1", "j", "l..ayer é 0003.png", layer_images(synth_dir, 1)[0])
    drain(w)
    assert "uint16 pixels scaled to 8 bit" in layer_row(w.cfg, "layer_0001.png")["note"]
    assert "colour converted to grey" in layer_row(w.cfg, "layer_0002.png")["note"]
    assert layer_row(w.cfg, "l..ayer é 0003.png")["status"] == "scored"
    plain = w.model.predict(grey).defect_score
    assert layer_row(w.cfg, "layer_0001.png")["score"] == pytest.approx(plain, abs=1e-5)


def test_unreadable_file_is_failed(watcher, synth_dir, monkeypatch):
    w = watcher()
    path = put(w.cfg, "p1", "j", "layer_0001.png", layer_images(synth_dir, 1)[0])
    path.chmod(0)
    if os.geteuid() == 0:  # root reads anything: make this one file unreadable at the boundary
        real = scoring.read_bytes

        def denied(p: Path, limit: int) -> bytes:
            if Path(p) == path:
                raise PermissionError(errno.EACCES, "Permission denied", str(p))
            return real(p, limit)

        monkeypatch.setattr(scoring, "read_bytes", denied)
    put(w.cfg, "p1", "j", "layer_0002.png", layer_images(synth_dir, 1)[0])
    drain(w)
    assert "Permission denied" in layer_row(w.cfg, "layer_0001.png")["error"]
    assert layer_row(w.cfg, "layer_0002.png")["status"] == "scored"


def test_inbox_or_job_folder_deleted_mid_job(watcher, synth_dir):
    w = watcher()
    src = layer_images(synth_dir, 1)[0]
    put(w.cfg, "p1", "j1", "layer_0001.png", src)
    put(w.cfg, "p2", "j2", "layer_0001.png", src)
    drain(w)
    shutil.rmtree(Path(w.cfg.inbox) / "p1" / "j1")
    put(w.cfg, "p2", "j2", "layer_0002.png", src)
    drain(w)
    shutil.rmtree(w.cfg.inbox)
    assert w.step() is False
    assert "cannot list inbox" in summary(w.state)["health"]["last_error"]
    put(w.cfg, "p2", "j2", "layer_0003.png", src)  # the share comes back
    drain(w)
    assert summary(w.state)["printers"]["p2"]["layers_scored"] == 3
    w.step(now=time.time() + 7200)  # the deleted job ends on idle time
    assert {j["job"]: j["ended_by"] for j in jobs(w.state)} == {"j1": "idle", "j2": "idle"}


def test_a_second_watcher_on_the_same_inbox_or_state_is_refused(watcher, tmp_path, exported):
    watcher()
    with pytest.raises(InspectError, match="another watcher"):
        Watcher(make_cfg(tmp_path, exported)).start()
    other_state = make_cfg(tmp_path, exported, state=str(tmp_path / "state2"))
    with pytest.raises(InspectError, match="inbox"):
        Watcher(other_state).start()


def test_disk_full_on_the_reject_log_is_recorded_and_retried(watcher, synth_dir, monkeypatch):
    w = watcher()

    def full(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal.RejectLog, "_write", staticmethod(full))
    for i, src in enumerate(layer_images(synth_dir, 2)):
        put(w.cfg, "p1", "j", f"layer_{i:04d}.png", src)
    drain(w)
    s = summary(w.state)
    assert s["layers_scored"] == 2 and "No space left" in s["health"]["last_error"]
    assert db(w.cfg).execute("SELECT COUNT(*) FROM decisions WHERE logged = 0").fetchone()[0] == 2
    monkeypatch.undo()  # space again
    w.step()
    lines = (w.state / "rejects.jsonl").read_text().splitlines()
    assert [json.loads(x)["kind"] for x in lines] == ["WARN", "REJECT"]


def test_model_replaced_on_disk_is_reloaded_only_on_request(watcher, tmp_path, exported, synth_dir):
    import onnx

    model = tmp_path / "model.onnx"
    shutil.copyfile(exported, model)
    w = watcher(model=str(model))
    old = w.model_sha
    src = layer_images(synth_dir, 1)[0]
    model.write_bytes(b"not a model")  # replaced while running
    put(w.cfg, "p1", "j", "layer_0001.png", src)
    drain(w)
    assert layer_row(w.cfg, "layer_0001.png")["model_sha"] == old
    (w.state / "reload.request").touch()  # a broken new model: refused, the old one goes on
    put(w.cfg, "p1", "j", "layer_0002.png", src)
    drain(w)
    assert "reload failed" in summary(w.state)["health"]["last_error"]
    assert layer_row(w.cfg, "layer_0002.png")["model_sha"] == old
    proto = onnx.load(str(exported))
    onnx.helper.set_model_props(proto, {p.key: p.value for p in proto.metadata_props} | {"v": "2"})
    onnx.save(proto, str(model))
    w.reload_requested.set()  # what SIGHUP does
    put(w.cfg, "p1", "j", "layer_0003.png", src)
    drain(w)
    new = layer_row(w.cfg, "layer_0003.png")["model_sha"]
    assert new != old and summary(w.state)["health"]["model_sha"] == new


# --- actions ------------------------------------------------------------------------------------
class Hook(http.server.BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hook.received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def finish_actions(w: Watcher) -> list[dict]:
    for _ in range(400):  # bounded: the outcome arrives from the action threads
        w.step()
        rows = [dict(r) for r in db(w.cfg).execute("SELECT * FROM actions ORDER BY id")]
        if rows and all(r["status"] not in ("pending", "running") for r in rows):
            return rows
        time.sleep(0.02)
    raise AssertionError(f"actions still pending: {rows}")


def test_command_and_webhook_run_on_reject(watcher, tmp_path, synth_dir):
    server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = tmp_path / "command.json"
    script = f"import sys; open({str(out)!r}, 'w').write(sys.stdin.read())"
    actions = ActionConfig(
        command=[sys.executable, "-c", script],
        webhook=f"http://127.0.0.1:{server.server_port}/hook",
        levels=("REJECT",),
    )
    w = watcher(actions=actions)
    for i, src in enumerate(layer_images(synth_dir, 2)):
        put(w.cfg, "p1", "j", f"layer_{i:04d}.png", src)
    rows = finish_actions(w)
    server.shutdown()
    assert sorted((r["name"], r["status"]) for r in rows) == [
        ("command", "done"),
        ("webhook", "done"),
    ]
    assert json.loads(out.read_text())["verdict"] == "REJECT"
    assert [r["verdict"] for r in Hook.received] == ["REJECT"]


def test_failing_actions_are_retried_recorded_and_do_not_stop_scoring(watcher, synth_dir):
    actions = ActionConfig(
        command=[sys.executable, "-c", "raise SystemExit(3)"],
        webhook="http://127.0.0.1:9/nothing-listens",
        retries=1,
        backoff_s=0.01,
        timeout_s=2,
    )
    w = watcher(actions=actions)
    for i, src in enumerate(layer_images(synth_dir, 3)):
        put(w.cfg, "p1", "j", f"layer_{i:04d}.png", src)
    rows = finish_actions(w)
    assert {(r["name"], r["status"], r["attempts"]) for r in rows} == {
        ("command", "failed", 2),
        ("webhook", "failed", 2),
    }
    assert "exited 3" in next(r["error"] for r in rows if r["name"] == "command")
    assert summary(w.state)["layers_scored"] == 3 and summary(w.state)["actions_failed"] == 2


# --- commands -----------------------------------------------------------------------------------
def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "inspect3d.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def test_simulate_watch_status_commands(tmp_path, exported, synth_dir):
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    r = cli("simulate", f"data={synth_dir}", f"inbox={inbox}", "printers=3", "rate=0", "max_jobs=4")
    assert r.returncode == 0, r.stderr
    assert len(list(inbox.glob("printer*/*/JOB_END"))) == 4
    r = cli(
        "watch", f"model={exported}", f"inbox={inbox}", f"state={state}",
        "until_idle=true", "settle_s=0", "policy.threshold=0.0",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "REJECT" in r.stdout and "caught at layer" in r.stdout
    r = cli("status", f"state={state}", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["jobs"] == 4 and s["layers_scored"] == 24 and s["layers_failed"] == 0
    assert s["rejects"] == 4
    for p in s["printers"].values():
        assert {"job", "layers_scored", "layers_failed", "decision"} <= set(p)
    assert s["health"]["provider"] == OnnxModel.load(exported).runtime  # auto's choice


def test_cli_errors_name_the_bad_value(tmp_path, exported):
    r = cli("watch", f"model={exported}", f"inbox={tmp_path}", f"state={tmp_path}/s", "polcy.k=2")
    assert r.returncode == 2 and "polcy" in r.stderr
    r = cli("watch", f"model={tmp_path}/none.onnx", f"inbox={tmp_path}/i", f"state={tmp_path}/s")
    assert r.returncode == 2 and "model file not found" in r.stderr
    r = cli("status", f"state={tmp_path}/nothing")
    assert r.returncode == 2 and "no watcher state" in r.stderr


def test_sigterm_finishes_and_exits_cleanly(tmp_path, exported, synth_dir):
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    put(make_cfg(tmp_path, exported), "p1", "j", "layer_0001.png", layer_images(synth_dir, 1)[0])
    cmd = [sys.executable, "-m", "inspect3d.cli", "watch", f"model={exported}"]
    proc = subprocess.Popen(
        [*cmd, f"inbox={inbox}", f"state={state}", "settle_s=0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for _ in range(600):  # bounded wait for the first layer to be recorded
        try:
            if summary(state)["layers_scored"] == 1:
                break
        except (InspectError, sqlite3.OperationalError):  # not created yet
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "watcher stopped" in (state / "watch.log").read_text()
    assert "p1" in out


def test_slowly_growing_files_are_waited_for_not_failed(tmp_path, exported, synth_dir):
    from inspect3d.watch.simulate import simulate

    cfg = make_cfg(tmp_path, exported, settle_s=0.3, poll_s=0.02, incomplete_s=5.0)
    w = Watcher(cfg)

    def serve() -> None:  # the store's connection lives in this thread; no signal handlers
        w.start()
        try:
            w.run()
        finally:
            w.close()

    runner = threading.Thread(target=serve)
    runner.start()
    try:
        jobs_ = simulate(synth_dir, cfg.inbox, printers=2, rate=20, mode="grow", max_jobs=2)
        expected = sum(len(j.layers) for j in jobs_)
        for _ in range(400):  # bounded wait for the watcher to catch up
            s = summary(w.state)
            if s["layers_scored"] + s["layers_failed"] >= expected:
                break
            time.sleep(0.05)
    finally:
        w.stop_requested.set()
        runner.join(timeout=60)
    s = summary(w.state)
    assert (s["layers_scored"], s["layers_failed"]) == (expected, 0)


def test_readable_log_rotates(tmp_path):
    import logging

    from inspect3d.watch.service import attach_log_file

    handler = attach_log_file(tmp_path, max_bytes=300, backups=2)
    try:
        for i in range(40):
            logging.getLogger("inspect3d.watch.test").warning("line %d of the watcher log", i)
    finally:
        logging.getLogger("inspect3d").removeHandler(handler)
        handler.close()
    assert sorted(p.name for p in tmp_path.glob("watch.log*")) == [
        "watch.log",
        "watch.log.1",
        "watch.log.2",
    ]


def test_simulate_reads_a_folder_per_class_without_manifest(tmp_path, synth_dir):
    from inspect3d.watch.simulate import load_jobs

    data = tmp_path / "data"
    shutil.copytree(synth_dir, data, ignore=shutil.ignore_patterns("manifest.csv", "_masks"))
    with_manifest, per_class = load_jobs(synth_dir), load_jobs(data)
    assert [(j.name, len(j.layers)) for j in per_class] == [
        (j.name, len(j.layers)) for j in with_manifest
    ]
    assert [j.first_defect_layer for j in per_class] == [
        j.first_defect_layer for j in with_manifest
    ]
    assert any(j.first_defect_layer is None for j in per_class)
    assert any(j.first_defect_layer is not None for j in per_class)


# --- state and evidence that can be moved and read ----------------------------------------------
def test_a_missing_inbox_is_an_error_not_created(tmp_path, exported):
    missing = tmp_path / "no" / "such" / "inbox"
    r = cli("watch", f"model={exported}", f"inbox={missing}", f"state={tmp_path}/s",
            "until_idle=true")  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert f"inbox '{missing}'" in r.stderr and "create it first" in r.stderr
    assert not missing.exists() and not missing.parent.exists()


def shop_images(state: Path) -> list[Path | None]:
    from inspect3d.review import shop

    store = shop.open_store(state)
    try:
        return [layer.image for job in shop.load(store).jobs for layer in job.layers]
    finally:
        store.close()


def test_report_and_review_find_images_from_another_folder(tmp_path, exported, synth_dir):
    """The watcher ran in one folder with relative paths; QA reads its state from another."""
    shop_dir, elsewhere = tmp_path / "shop", tmp_path / "elsewhere"
    shop_dir.mkdir()
    elsewhere.mkdir()
    r = cli("simulate", f"data={synth_dir}", "inbox=demo/inbox", "printers=2", "rate=0",
            "max_jobs=2", cwd=shop_dir)  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = cli("watch", f"model={exported}", "inbox=demo/inbox", "state=demo/watch",
            "until_idle=true", "settle_s=0", cwd=shop_dir)  # fmt: skip
    assert r.returncode == 0, r.stderr
    state = shop_dir / "demo" / "watch"
    meta = json.loads(dict(db_rows(state, "SELECT key, value FROM meta"))["inbox"])
    assert meta == str(shop_dir / "demo" / "inbox")  # stored absolute

    r = cli("report", f"state={state}", f"out={elsewhere / 'report'}", cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    pages = "".join(p.read_text() for p in (elsewhere / "report").rglob("*.html"))
    assert "is gone" not in pages
    os.chdir(elsewhere)  # review reads the same shop: every layer's image is found
    try:
        images = shop_images(state)
        assert images and all(p is not None and p.is_file() for p in images)
        # a state written before paths were stored absolute: found from the state folder
        with sqlite3.connect(state / "watch.db") as con:
            con.execute("UPDATE meta SET value = ? WHERE key = 'inbox'", ('"demo/inbox"',))
        again = shop_images(state)
        assert again == images
    finally:
        os.chdir(tmp_path)
    r = cli("review", "--help", cwd=elsewhere)
    assert r.returncode == 0, r.stderr


def db_rows(state: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(state / "watch.db") as con:
        return con.execute(sql).fetchall()
