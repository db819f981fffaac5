"""Faults an attacker (or a bad day on the shop floor) brings to the watcher and the review page:
each is recorded with its reason, stays with the file or job that caused it, and never stops
the cell; every side effect (reject log, actions, evidence) happens once."""

from __future__ import annotations

import contextlib
import errno
import http.server
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import cv2
import numpy as np
import pytest
from test_watch import db, drain, finish_actions, layer_images, layer_row, make_cfg, put

from inspect3d.data.layout import folder_name, from_folder, name_text, text_name
from inspect3d.data.preprocess import decode_image
from inspect3d.errors import InspectError
from inspect3d.watch import journal, scoring
from inspect3d.watch.actions import ActionRunner
from inspect3d.watch.config import ActionConfig, WatchConfig
from inspect3d.watch.imageinfo import ImageRefused, image_info
from inspect3d.watch.service import Watcher
from inspect3d.watch.status import summary
from inspect3d.watch.store import Store


def put_raw(cfg: WatchConfig, rel: bytes, data: bytes) -> Path:
    """A file whose path below the inbox is any bytes (not necessarily UTF-8)."""
    path = os.fsencode(cfg.inbox) + b"/" + rel
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return Path(os.fsdecode(path))


@contextlib.contextmanager
def alarm(seconds: int):
    """Fail (not hang) when the block takes longer than ``seconds``."""

    def expired(*_):
        raise AssertionError(f"blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def rows(cfg: WatchConfig, sql: str, *args) -> list[dict]:
    return [dict(r) for r in db(cfg).execute(sql, args)]


def run_until_idle(cfg: WatchConfig, setup=None, timeout: float = 120) -> None:
    """Start a watcher and ``run()`` it (the loop itself, with its error handling) until the
    inbox is drained, in a thread of its own (its store lives there), bounded."""

    def serve() -> None:
        w = Watcher(cfg).start()
        try:
            if setup is not None:
                setup(w)
            w.run()
        finally:
            w.close()

    t = threading.Thread(target=serve)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the watcher loop is stuck"


# --- 1. names: any bytes, any number; anything unexpected stays with its layer -------------------
def test_non_utf8_names_and_huge_layer_numbers_are_failed_and_other_printers_scored(
    tmp_path, exported, synth_dir
):
    w = Watcher(make_cfg(tmp_path, exported, until_idle=True))
    good = layer_images(synth_dir, 1)[0].read_bytes()
    put_raw(w.cfg, b"p1/j/layer_\xff\xfe_0001.png", good)
    put_raw(w.cfg, b"p1/j/layer_99999999999999999999.png", good)
    put_raw(w.cfg, b"p3/j\xe9/layer_0001.png", good)  # a Latin-1 job folder
    put(w.cfg, "p2", "j2", "layer_0001.png", good)
    run_until_idle(w.cfg)
    (bad,) = rows(w.cfg, "SELECT * FROM layers WHERE rel LIKE 'p1/j/%' AND error LIKE '%UTF-8%'")
    assert bad["status"] == "failed" and "not valid UTF-8" in bad["error"]
    assert os.fsencode(text_name(bad["rel"])) == b"p1/j/layer_\xff\xfe_0001.png"  # lossless
    huge = layer_row(w.cfg, "layer_99999999999999999999.png")
    assert huge["status"] == "failed" and "99999999999999999999" in huge["error"]
    assert "out of range" in huge["error"]
    (latin,) = rows(w.cfg, "SELECT * FROM layers WHERE rel LIKE 'p3/%'")
    assert latin["status"] == "failed" and "not valid UTF-8" in latin["error"]
    assert layer_row(w.cfg, "j2/layer_0001.png")["status"] == "scored"
    run_until_idle(w.cfg)  # a restart does not die on them either, nor records them twice
    assert len(rows(w.cfg, "SELECT id FROM layers")) == 4


def test_an_unexpected_error_stays_with_its_layer_and_is_shown(
    tmp_path, exported, synth_dir, monkeypatch
):
    w = Watcher(make_cfg(tmp_path, exported, until_idle=True))
    real = Store.insert_layer

    def buggy(self, job_id, layer, result, model_sha, now):
        if result.status == "scored" and result.arrival.printer == "p1":
            raise RuntimeError("boom in p1")
        return real(self, job_id, layer, result, model_sha, now)

    monkeypatch.setattr(Store, "insert_layer", buggy)

    def scan_broken_once(w: Watcher) -> None:
        real_poll, calls = w.scanner.poll, []

        def poll(*a, **k):
            calls.append(1)
            if len(calls) == 1:
                raise KeyError("a bug in the scan")
            return real_poll(*a, **k)

        w.scanner.poll = poll

    src = layer_images(synth_dir, 1)[0]
    put(w.cfg, "p1", "j", "layer_0001.png", src)
    put(w.cfg, "p2", "j", "layer_0001.png", src)
    run_until_idle(w.cfg, scan_broken_once)
    failed = rows(w.cfg, "SELECT * FROM layers WHERE rel LIKE 'p1/%'")[0]
    assert failed["status"] == "failed"
    assert "cannot be recorded as it is: RuntimeError: boom in p1" in failed["error"]
    assert rows(w.cfg, "SELECT status FROM layers WHERE rel LIKE 'p2/%'")[0]["status"] == "scored"
    errors = [r["message"] for r in rows(w.cfg, "SELECT message FROM errors")]
    assert any("KeyError" in e for e in errors) and any("boom in p1" in e for e in errors)
    s = summary(w.state)
    assert "boom in p1" in s["health"]["last_error"] and s["errors"] == len(errors)


# --- 2. the pixel and memory budget, judged from content -----------------------------------------
def tiff_header_only(width: int, height: int) -> bytes:
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (277, 3, 1, 1)]
    ifd = struct.pack("<H", len(entries))
    ifd += b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0\0\0\0"
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\0" * 64


def encoded(ext: str, image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, image)
    assert ok
    return buf.tobytes()


def test_the_pixel_budget_holds_for_content_not_names(watcher, synth_dir, monkeypatch):
    w = watcher(max_pixels=10_000_000, max_image_bytes=200_000)
    decoded = []
    real = scoring.decode_image
    monkeypatch.setattr(
        scoring, "decode_image", lambda data, *a: decoded.append(len(data)) or real(data, *a)
    )
    rgb16 = np.full((200, 200, 3), 40000, np.uint16)  # compresses well: a small file
    hdr = np.random.default_rng(1).random((64, 64, 3)).astype(np.float32)
    grey = cv2.imread(str(layer_images(synth_dir, 1)[0]), cv2.IMREAD_GRAYSCALE)
    put(w.cfg, "p1", "j", "layer_0001.tif", tiff_header_only(20000, 20000))
    put(w.cfg, "p1", "j", "layer_0002.png", encoded(".hdr", hdr))
    put(w.cfg, "p1", "j", "layer_0003.png", encoded(".png", rgb16))  # 240,000 bytes decoded
    put(w.cfg, "p1", "j", "layer_0004.tif", encoded(".jpg", grey))
    put(w.cfg, "p1", "j", "layer_0005.png", bytes(random.Random(0).randbytes(4096)))
    put(w.cfg, "p1", "j", "layer_0006.png", encoded(".webp", grey))
    put(w.cfg, "p1", "j", "layer_0007.png", encoded(".png", grey))
    drain(w)
    reasons = {
        "layer_0001.tif": "20000x20000 pixels, above max_pixels=10000000",
        "layer_0002.png": "content is Radiance HDR, not a layer image",
        "layer_0003.png": "needs 240000 bytes to decode, above max_image_bytes=200000",
        "layer_0004.tif": "content is JPEG but the name says .tif",
        "layer_0005.png": "content is unknown content",
        "layer_0006.png": "content is WebP",
    }
    for name, why in reasons.items():
        row = layer_row(w.cfg, name)
        assert row["status"] == "failed" and why in row["error"], (name, row["error"])
    assert layer_row(w.cfg, "layer_0007.png")["status"] == "scored"
    assert len(decoded) == 1  # only the good file reached a decoder


@pytest.mark.parametrize(
    ("ext", "shape", "dtype", "channels", "sample"),
    [
        (".png", (30, 40), np.uint8, 1, 1),
        (".png", (30, 40, 3), np.uint16, 3, 2),
        (".jpg", (30, 40, 3), np.uint8, 3, 1),
        (".bmp", (30, 40), np.uint8, 3, 1),
        (".tif", (30, 40, 3), np.uint16, 3, 2),
        (".tif", (30, 40), np.float32, 1, 4),
    ],
)
def test_header_sizes_match_what_opencv_decodes(ext, shape, dtype, channels, sample):
    image = (np.random.default_rng(0).random(shape) * 200).astype(dtype)
    data = encoded(ext, image)
    info = image_info(data, "x" + ext)
    out = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    assert (info.height, info.width) == out.shape[:2] == (30, 40)
    assert (info.channels, info.sample_bytes) == (channels, sample)
    assert out.nbytes <= info.decoded_bytes  # an upper bound of what the decode allocates


def test_decoding_stays_within_the_documented_memory_bound():
    limits = scoring.Limits(max_pixels=10**8, max_image_bytes=6_000_000)
    rgb16 = (np.random.default_rng(0).random((1000, 1000, 3)) * 4095).astype(np.uint16)
    data = encoded(".png", rgb16)  # 12-bit noise: a file that could be taken (<= the limit)
    assert len(data) <= limits.max_image_bytes
    assert image_info(data, "a.png").decoded_bytes == limits.max_image_bytes  # at the limit
    tracemalloc.start()
    try:
        decode_image(data, 1, "x")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(data) + peak <= scoring.decode_memory_bound(limits, threads=1)
    defaults = WatchConfig(model="m", inbox="i", state="s")
    bound = scoring.decode_memory_bound(
        scoring.Limits(defaults.max_pixels, defaults.max_image_bytes)
    )
    assert bound < 1_000_000_000


def test_malformed_headers_are_refused_not_raised():
    for data, name in [
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 8, "a.png"),
        (b"\xff\xd8\xff\xe0\x00\x10" + b"\0" * 20, "a.jpg"),
        (b"II*\x00\xff\xff\xff\x7f" + b"\0" * 20, "a.tif"),
        (b"BM" + b"\0" * 10, "a.bmp"),
    ]:
        with pytest.raises(ImageRefused):
            image_info(data, name)


# --- 3. only regular files, never blocking; folders ----------------------------------------------
def test_a_fifo_never_blocks_and_folders_are_recorded(watcher, synth_dir, tmp_path, exported):
    w = watcher()
    src = layer_images(synth_dir, 1)[0]
    fifo = Path(w.cfg.inbox) / "p1" / "j" / "layer_0001.png"
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    (Path(w.cfg.inbox) / "p1" / "j" / "layer_0002.png").mkdir()
    (Path(w.cfg.inbox) / "p1" / "j" / "_parts").mkdir()  # not an image name: not a layer
    put(w.cfg, "p1", "j", "layer_0003.png", src)
    put(w.cfg, "p2", "jo\\b", "layer_0001.png", src)  # a backslash is part of the name
    with alarm(120):  # a blocking open() of the FIFO would be interrupted here
        drain(w)
    assert "is a FIFO, not a regular file" in layer_row(w.cfg, "j/layer_0001.png")["error"]
    assert "is a directory, not a regular file" in layer_row(w.cfg, "j/layer_0002.png")["error"]
    assert layer_row(w.cfg, "j/layer_0003.png")["status"] == "scored"
    back = rows(w.cfg, "SELECT l.status, j.name FROM layers l JOIN jobs j ON j.id = l.job_id "
                "WHERE j.printer = 'p2'")  # fmt: skip
    assert back == [{"status": "scored", "name": "jo\\b"}]
    assert len(rows(w.cfg, "SELECT id FROM layers")) == 4
    inside = make_cfg(tmp_path, exported, state=str(tmp_path / "inbox" / "state"))
    with pytest.raises(InspectError, match="is inside the inbox"):
        Watcher(inside).start()


# --- 4. incomplete files -------------------------------------------------------------------------
def test_incomplete_files_are_retried_when_they_change_then_failed(watcher, synth_dir):
    w = watcher(incomplete_s=600.0, incomplete_tries=3)
    data = layer_images(synth_dir, 1)[0].read_bytes()
    slow = put(w.cfg, "p1", "j", "layer_0001.png", data[: len(data) // 2])
    stuck = put(w.cfg, "p1", "j", "layer_0002.png", data[: len(data) // 3])
    flaky = put(w.cfg, "p1", "j", "layer_0003.png", data[:100])
    drain(w)
    assert rows(w.cfg, "SELECT id FROM layers") == []  # none taken as broken yet
    assert summary(w.state)["health"]["waiting"] >= 0
    slow.write_bytes(data)  # the second half lands
    for n in range(2):  # flaky keeps changing, always cut short
        flaky.write_bytes(data[: 200 + 100 * n])
        os.utime(flaky, (time.time() - 100 + n, time.time() - 100 + n))
        drain(w)
    assert layer_row(w.cfg, "layer_0001.png")["status"] == "scored"
    assert "gave up" in layer_row(w.cfg, "layer_0003.png")["error"]
    assert rows(w.cfg, "SELECT id FROM layers WHERE rel LIKE '%layer_0002.png'") == []
    w.step(now=time.time() + 601)
    w.step(now=time.time() + 601)
    row = layer_row(w.cfg, "layer_0002.png")
    assert row["status"] == "failed" and "unchanged for 600 s" in row["error"]
    assert stuck.exists()


# --- 5. the reject log under a full disk ---------------------------------------------------------
def test_a_short_write_leaves_no_partial_record(watcher, synth_dir, monkeypatch):
    w = watcher()

    def half_then_full(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    for i, src in enumerate(layer_images(synth_dir, 1)):
        put(w.cfg, "p1", "j", f"layer_{i:04d}.png", src)
    drain(w)
    log_path = w.state / "rejects.jsonl"
    before = log_path.read_bytes()
    monkeypatch.setattr(journal.RejectLog, "_write", staticmethod(half_then_full))
    put(w.cfg, "p1", "j", "layer_0001.png", layer_images(synth_dir, 2)[1])
    drain(w)
    assert log_path.read_bytes() == before  # cut back: nothing half-written
    assert "No space left" in summary(w.state)["health"]["last_error"]
    monkeypatch.undo()
    w.step()
    lines = log_path.read_bytes().splitlines()
    assert [json.loads(x)["kind"] for x in lines] == ["WARN", "REJECT"]


def test_broken_records_are_set_aside_on_start(watcher, synth_dir, tmp_path, exported):
    cfg = make_cfg(tmp_path, exported)
    w = Watcher(cfg).start()
    for i, src in enumerate(layer_images(synth_dir, 2)):
        put(cfg, "p1", "j", f"layer_{i:04d}.png", src)
    drain(w)
    w.close()
    log_path = w.state / "rejects.jsonl"
    first, second = log_path.read_bytes().splitlines(keepends=True)
    log_path.write_bytes(first + b'{"decision_id": 7, "kind": "WA\n' + second + second[:9])
    w = Watcher(cfg).start()
    try:
        drain(w)
        assert log_path.read_bytes() == first + second
        broken = (w.state / "rejects.broken.jsonl").read_bytes().splitlines()
        assert broken == [b'{"decision_id": 7, "kind": "WA', second[:9]]
        assert "2 broken record(s)" in summary(w.state)["health"]["last_error"]
    finally:
        w.close()


DISK_FULL = """
import sqlite3, sys
from inspect3d.watch.store import Store
def full(*a, **k):
    raise sqlite3.OperationalError("database or disk is full")
for name in ("set_meta", "record_error", "transaction", "store_id", "interrupted_actions"):
    setattr(Store, name, full)
from inspect3d.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_starting_on_a_full_disk_waits_and_sigterm_exits_0(tmp_path, exported, synth_dir):
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    put(make_cfg(tmp_path, exported), "p1", "j", "layer_0001.png", layer_images(synth_dir, 1)[0])
    cmd = [sys.executable, "-c", DISK_FULL, "watch", f"model={exported}", f"inbox={inbox}",
           f"state={state}", "settle_s=0"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log_file = state / "watch.log"
    for _ in range(1200):  # bounded wait until the loop has met the full disk
        if log_file.exists() and "watcher step failed" in log_file.read_text():
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "watcher stopped" in log_file.read_text()


# --- 6. actions: once per decision and level, keyed ----------------------------------------------
class Hook(http.server.BaseHTTPRequestHandler):
    keys: list[str] = []

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        Hook.keys.append(self.headers["Idempotency-Key"])
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_actions_carry_an_idempotency_key_and_run_once(watcher, tmp_path, synth_dir):
    server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ran = tmp_path / "ran.txt"
    script = (
        f"import os; open({str(ran)!r}, 'a').write(os.environ['INSPECT3D_IDEMPOTENCY_KEY'] + ' ' + "
        "os.environ['INSPECT3D_DECISION_ID'] + '\\n')"
    )
    actions = ActionConfig(
        command=[sys.executable, "-c", script],
        webhook=f"http://127.0.0.1:{server.server_port}/hook",
        levels=("WARN", "REJECT"),
    )
    w = watcher(actions=actions)
    for i, src in enumerate(layer_images(synth_dir, 3)):
        put(w.cfg, "p1", "j", f"layer_{i:04d}.png", src)
    acts = finish_actions(w)
    for _ in range(5):
        w.step()
    server.shutdown()
    sid = summary(w.state)["health"]["store_id"]
    dids = sorted({a["decision_id"] for a in acts})
    assert len(dids) == 2 and {a["status"] for a in acts} == {"done"}
    lines = sorted(ran.read_text().split("\n")[:-1])
    assert lines == sorted(f"{sid}-{d} {d}" for d in dids)  # once each, keyed
    assert sorted(Hook.keys) == sorted(f"{sid}-{d}" for d in dids)


def test_an_action_interrupted_by_a_crash_is_may_have_run_not_rerun(
    tmp_path, exported, synth_dir, monkeypatch
):
    ran = tmp_path / "ran.txt"
    actions = ActionConfig(command=[sys.executable, "-c", f"open({str(ran)!r}, 'a').write('x')"])
    cfg = make_cfg(tmp_path, exported, actions=actions)
    w = Watcher(cfg).start()
    monkeypatch.setattr(ActionRunner, "submit", lambda *a: None)  # killed as it starts
    for i, src in enumerate(layer_images(synth_dir, 2)):
        put(cfg, "p1", "j", f"layer_{i:04d}.png", src)
    drain(w)
    assert [a["status"] for a in rows(cfg, "SELECT status FROM actions")] == ["running"]
    w.store.close()  # a kill -9: nothing else happens
    w._release()
    monkeypatch.undo()
    w = Watcher(cfg).start()
    try:
        for _ in range(20):
            w.step()
        (act,) = rows(cfg, "SELECT * FROM actions")
        assert act["status"] == "unknown" and "may have run" in act["error"]
        s = summary(w.state)
        assert s["actions_unknown"] == 1 and "may have run" in s["health"]["last_error"]
        assert not ran.exists()  # not run again blindly
    finally:
        w.close()


# --- 7. evidence folders -------------------------------------------------------------------------
def test_folder_names_are_reversible_and_collision_free():
    rng = random.Random(0)
    alphabet = "ab<>/\\:*?%._- é\x00\u202e.."
    names = {"", ".", "..", "c<1>", "c>1<", "c_1_"}
    names |= {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8))) for _ in range(3000)}
    folders = {folder_name(n) for n in names}
    assert len(folders) == len(names)
    for n in names:
        f = folder_name(n)
        assert from_folder(f) == n and "/" not in f and not f.startswith(".") and "\0" not in f
    raw = {os.fsdecode(bytes(rng.randrange(256) for _ in range(6))) for _ in range(3000)}
    texts = {name_text(n) for n in raw | {"a\\xffb", "a\\\\xffb"}}
    assert len(texts) == len(raw | {"a\\xffb", "a\\\\xffb"})
    assert all(text_name(name_text(n)) == n for n in raw)
    assert all(t.encode("utf-8") for t in texts)  # all storable as text


def test_evidence_of_jobs_named_alike_never_collides(watcher, synth_dir):
    from inspect3d.review import shop

    w = watcher()
    imgs = layer_images(synth_dir, 4)
    for job, pair in (("c<1>", imgs[:2]), ("c>1<", imgs[2:])):
        for i, src in enumerate(pair):
            put(w.cfg, "p1", job, f"layer_{i:04d}.png", src)
        drain(w)
    review = w.state / "review" / "p1"
    assert sorted(from_folder(p.name) for p in review.iterdir()) == ["c<1>", "c>1<"]
    for p in Path(w.cfg.inbox).rglob("*.png"):
        p.unlink()  # the inbox is emptied: review reads the evidence copies
    store = shop.open_store(w.state)
    try:
        found = {j.name: [x.image for x in j.layers] for j in shop.load(store).jobs}
    finally:
        store.close()
    assert all(p is not None for paths in found.values() for p in paths)
    assert {from_folder(p.parent.name) for p in found["c<1>"]} == {"c<1>"}
    assert {from_folder(p.parent.name) for p in found["c>1<"]} == {"c>1<"}
    # evidence written under the old lossy names is still found, but only the layer's own file
    old = w.state / "review" / "p1" / "c_1_"
    (review / folder_name("c<1>")).rename(old)
    store = shop.open_store(w.state)
    try:
        again = {j.name: [x.image for x in j.layers] for j in shop.load(store).jobs}
    finally:
        store.close()
    assert all(p is not None and p.parent == old for p in again["c<1>"])
    assert found["c>1<"] == again["c>1<"]


# --- 8. the review server ------------------------------------------------------------------------
@pytest.fixture
def review_server(watcher, synth_dir, monkeypatch):
    from review_fixtures import serving

    from inspect3d.review import server as review_server_module

    monkeypatch.setattr(review_server_module.Handler, "timeout", 1.0)
    w = watcher()
    for i, src in enumerate(layer_images(synth_dir, 2)):
        put(w.cfg, "p1", "j", f"layer_{i:04d}.png", src)
    drain(w)
    w.close()
    with serving(w.state, "tester") as srv:
        yield srv


def post(srv, form: dict, headers: dict | None = None) -> tuple[int, str]:
    port = srv.server_address[1]
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/review", data=urlencode(form).encode(), headers=headers or {}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_review_refuses_huge_ids_and_foreign_origins(review_server):
    srv, token = review_server, review_server.token
    form = {"token": token, "decision": "unsure", "reason": "", "note": ""}
    for bad in ("99999999999999999999", "-1", "0", "1e3", "１"):
        status, body = post(srv, {**form, "layer_id": bad})
        assert status == 400 and "is not valid: use a layer number" in body, (bad, body)
    port = srv.server_address[1]
    status, body = post(srv, {**form, "layer_id": "1"}, {"Origin": "http://evil.example"})
    assert status == 403 and "Origin" in body
    status, _ = post(srv, {**form, "layer_id": "1"}, {"Origin": f"http://127.0.0.1:{port}"})
    assert status == 200
    status, _ = post(srv, {**form, "layer_id": "1"}, {"Sec-Fetch-Site": "cross-site"})
    assert status == 403


def test_review_bounds_connections_and_times_out_idle_ones(review_server, monkeypatch):
    from inspect3d.review import server as module
    from inspect3d.review.server import MAX_CONNECTIONS

    monkeypatch.setattr(module.Handler, "timeout", 5.0)  # idle ones hold their slot a while
    monkeypatch.setattr(module, "ACCEPT_WAIT_S", 0.05)  # the ones beyond the cap: 503 soon

    port = review_server.server_address[1]
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_CONNECTIONS + 8)]
    try:
        time.sleep(0.2)  # let the server accept what it will (no timing is asserted)
        assert threading.active_count() <= before + MAX_CONNECTIONS  # capped, not one each
        answers = []
        for s in idle:  # each is answered 503 or dropped when idle: none is held forever
            s.settimeout(60)
            answers.append(s.recv(100))
    finally:
        for s in idle:
            s.close()
    assert all(a == b"" or a.startswith(b"HTTP/1.1 503") for a in answers)
    assert any(a.startswith(b"HTTP/1.1 503") for a in answers)
    assert answers.count(b"") >= MAX_CONNECTIONS  # the idle ones timed out
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as r:
        assert r.status == 200  # served again once the idle ones are gone


def test_review_renders_a_few_pages_at_a_time(review_server, monkeypatch):
    from inspect3d.review import server as module

    real, active, most = module.Handler._page, [0], [0]
    lock = threading.Lock()

    def counted(self, job_arg):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            time.sleep(0.2)  # long enough for the others to pile up (nothing timed is asserted)
            return real(self, job_arg)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(module.Handler, "_page", counted)
    port = review_server.server_address[1]

    def get() -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60) as r:
            return r.status

    statuses = []
    threads = [threading.Thread(target=lambda: statuses.append(get())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert statuses == [200] * 8
    assert most[0] <= module.RENDER_SLOTS
