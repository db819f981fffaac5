"""kill -9 soak with bad inputs: jobs replayed into an inbox with every bad file of issue 12
mixed in, slow writers among the good layers, actions on every decision, and the watcher
killed at random; then counted.

Counted (and, by ``tests/test_watch_soak.py`` on a short run, asserted): good layers lost (not
scored), bad files not recorded exactly once with their reason, actions run more than once per
decision and level, actions left "may have run", reject-log records written twice, and the
watcher processes' peak memory against the documented bound.

    python benchmarks/quality/watch_soak.py --model RUN/model.onnx --data SYNTH_DIR \
        [--rounds 6] [--printers 4] [--kills 40] [--seed 0]

(``--data``: a data set of ``inspect3d synth``; prints the counts as JSON.) ``--memory``: the
peak RSS of a watcher scoring layers right at the default decode budget instead.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from inspect3d.data.layout import text_name
from inspect3d.watch.simulate import load_jobs, write_layer

# kind -> (file name below the job folder, what its failure reason must say)
BAD = {
    "non_utf8": (b"bad_\xff\xfe.png", "not valid UTF-8"),
    "huge_layer": (b"layer_99999999999999999999.png", "out of range"),
    "control_chars": (b"bad\nname.png", "control characters"),
    "hdr_as_png": (b"bad_hdr.png", "content is Radiance HDR"),
    "webp_as_png": (b"bad_webp.png", "content is WebP"),
    "jpeg_as_tif": (b"bad_jpeg.tif", "content is JPEG but the name says .tif"),
    "tiff_bomb": (b"bad_bomb.tif", "above max_pixels"),
    "png16_over_budget": (b"bad_png16.png", "needs 200000000 bytes to decode"),
    "fifo": (b"bad_fifo.png", "is a FIFO"),
    "folder": (b"bad_folder.png", "is a directory"),
    "cut_short": (b"bad_cut.png", "cannot decode"),  # never completed: given up, with reason
    "empty": (b"bad_empty.png", "0 bytes"),
}
SLOW_EVERY = 9  # every 9th good layer is written in two halves 0.3 s apart


def png_header(width: int, height: int, depth: int, colour: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    )


def tiff_header(width: int, height: int) -> bytes:
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (277, 3, 1, 1)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\0" * 68


def write_bad(folder: Path, kind: str, good: bytes) -> bytes:
    """Write one bad input of ``kind`` into ``folder``; returns its path below the inbox."""
    name, _ = BAD[kind]
    path = os.fsencode(folder) + b"/" + name
    os.makedirs(os.fsencode(folder), exist_ok=True)
    grey = cv2.imdecode(np.frombuffer(good, np.uint8), cv2.IMREAD_GRAYSCALE)
    content = {
        "hdr_as_png": lambda: cv2.imencode(".hdr", np.float32(np.dstack([grey] * 3)) / 255)[1],
        "webp_as_png": lambda: cv2.imencode(".webp", grey)[1],
        "jpeg_as_tif": lambda: cv2.imencode(".jpg", grey)[1],
        "tiff_bomb": lambda: tiff_header(20000, 20000),
        "png16_over_budget": lambda: png_header(5000, 5000, 16, 6) + b"\0" * 64,
        "cut_short": lambda: good[: len(good) // 2],
        "empty": lambda: b"",
    }.get(kind, lambda: good)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        os.mkdir(path)
    else:
        with open(path + b".part", "wb") as f:
            f.write(bytes(content()))
        os.replace(path + b".part", path)
    return path


def replay_with_faults(inbox: Path, data: Path, rounds: int, printers: int, seed: int) -> dict:
    """Write every job ``rounds`` times, printers interleaved, two bad inputs per job; returns
    {"good": [rel], "bad": {rel: reason}}."""
    rng = random.Random(seed)
    base = load_jobs(data)
    jobs = [(f"r{r}-{j.name}", list(j.layers)) for r in range(rounds) for j in base]
    order = list(BAD)
    rng.shuffle(order)
    plan = {}  # job -> {layers left when the bad input is written: its kind}, two kinds a job
    for k, (name, layers) in enumerate(jobs):
        first, second = order[2 * k % len(order)], order[(2 * k + 1) % len(order)]
        plan[name] = {0: first, rng.randrange(1, max(2, len(layers))): second}
    queues = [jobs[p::printers] for p in range(printers)]
    written: dict = {"good": [], "bad": {}}
    n = 0
    while any(queues):
        for p, queue in enumerate(queues):
            if queue:
                n += _write_next(inbox, f"printer{p}", queue, plan, written, n)
            time.sleep(0.02)
    return written


def _write_next(inbox: Path, printer: str, queue: list, plan: dict, written: dict, n: int) -> int:
    name, layers = queue[0]
    folder = inbox / printer / name
    index = len(written["good"])
    item = layers.pop(0)
    kind = plan[name].pop(len(layers), None)
    if kind is not None:
        path = write_bad(folder, kind, item.path.read_bytes())
        rel = os.fsdecode(path)[len(str(inbox)) + 1 :]
        written["bad"][rel] = BAD[kind][1]
    mode = "grow" if index % SLOW_EVERY == SLOW_EVERY - 1 else "rename"
    write_layer(item.path, folder / item.path.name, mode, pause_s=0.3)
    written["good"].append(f"{printer}/{name}/{item.path.name}")
    if not layers:
        (folder / "JOB_END").touch()
        queue.pop(0)
    return 1


def watch_command(model: Path, inbox: Path, state: Path, ran: Path, threshold: float) -> list:
    """The watcher, with an action on every decision that notes its idempotency key."""
    script = ran.with_suffix(".sh")
    script.write_text(f'echo "$INSPECT3D_IDEMPOTENCY_KEY" >> "{ran}"\n')
    return [
        sys.executable, "-m", "inspect3d.cli", "watch", f"model={model}", f"inbox={inbox}",
        f"state={state}", "settle_s=0.05", "poll_s=0.05", "policy.k=2", "policy.n=3",
        f"policy.threshold={threshold}", "incomplete_s=1", "incomplete_tries=3",
        f"actions.command=[/bin/sh,{script}]",
        "actions.levels=[WARN,REJECT,FINAL_OK,FINAL_WARN,FINAL_REJECT]",
    ]  # fmt: skip


START_GRACE_S = 5.0  # a watcher that has scored nothing by then is killed on its own clock


def run_watcher(
    cmd: list, kill_after: float | None, state: Path | None = None
) -> tuple[int, int, str]:
    """(exit status, peak RSS in KiB of this watcher process, stderr tail): killed with -9
    ``kill_after`` seconds after it is at work (with ``state``: from the first layer it
    stores, or ``START_GRACE_S`` after it starts; its start-up time varies with the machine's
    load and runtime), or run to its end (``until_idle``). The peak is the watcher's own
    high-water mark (``VmHWM`` of its memory after exec, read while it runs): ``wait4``'s
    ``ru_maxrss`` would also count the forked copy of this (possibly large) parent process."""
    with tempfile.TemporaryFile() as err:
        before = None if state is None else layer_count(state)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        peak, start = 0, time.monotonic()
        while proc.poll() is None:
            peak = max(peak, high_water_kib(proc.pid))
            if before is not None and (
                layer_count(state) > before or time.monotonic() - start >= START_GRACE_S
            ):
                before, start = None, time.monotonic()  # at work: its life starts now
            if kill_after is not None and before is None and time.monotonic() - start >= kill_after:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.02)
        err.seek(0)
        return proc.returncode, peak, err.read().decode(errors="replace")[-2000:]


def high_water_kib(pid: int) -> int:
    """Peak resident memory (KiB) of process ``pid`` so far; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def median_peak(model: Path, data: Path) -> float:
    """A threshold that half the jobs' peak layer scores reach: both outcomes happen."""
    from inspect3d.infer import OnnxModel

    m = OnnxModel.load(model)
    peaks = [
        max(s.defect_score for s in m.predict_batch([i.path for i in j.layers]))
        for j in load_jobs(data)
    ]
    return float(np.median(peaks))


def soak(
    model: Path,
    data: Path,
    work: Path,
    plan: tuple[int, int, int, int],
    life_s: tuple[float, float] = (0.6, 2.0),
) -> dict:
    """Replay with faults while killing the watcher; returns the counts. ``plan``: rounds of
    the data set's jobs, printers, kills at least, seed; each watcher lives a random time in
    ``life_s`` at work before its kill -9."""
    rounds, printers, kills, seed = plan
    inbox, state, ran = work / "inbox", work / "state", work / "actions_ran.txt"
    inbox.mkdir(parents=True)
    cmd = watch_command(model, inbox, state, ran, median_peak(model, data))
    written: dict = {}

    def write() -> None:
        try:
            written.update(replay_with_faults(inbox, data, rounds, printers, seed))
        except BaseException as exc:  # reported after the watcher is stopped
            written["error"] = exc

    writer = threading.Thread(target=write)
    writer.start()
    rng, done, progressed, last, peak = random.Random(seed), 0, 0, 0, 0
    while done < kills or writer.is_alive():
        _, rss, _ = run_watcher(cmd, rng.uniform(*life_s), state)
        done, peak = done + 1, max(peak, rss)
        now = layer_count(state)
        progressed, last = progressed + (now > last), now
    writer.join()
    if "error" in written:
        raise RuntimeError("replaying the jobs failed") from written["error"]
    rc, rss, err = run_watcher([*cmd, "until_idle=true"], None)
    if rc != 0:
        raise RuntimeError(f"final watcher run exited {rc}: {err}")
    counts = count(state, written, ran)
    counts.update(kills=done, kills_at_work=progressed, peak_rss_mb=round(max(peak, rss) / 1024))
    return counts


def layer_count(state: Path) -> int:
    try:
        with sqlite3.connect(state / "watch.db") as con:
            return con.execute("SELECT COUNT(*) FROM layers").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def count(state: Path, written: dict, ran: Path) -> dict:
    """The soak's outcome: what was lost, what happened twice."""
    con = sqlite3.connect(state / "watch.db")
    layers = {
        text_name(r[0]): (r[1], r[2]) for r in con.execute("SELECT rel, status, error FROM layers")
    }
    lost = [rel for rel in written["good"] if layers.get(rel, ("",))[0] != "scored"]
    wrong = {
        rel: layers.get(rel)
        for rel, why in written["bad"].items()
        if layers.get(rel, ("", ""))[0] != "failed" or why not in (layers[rel][1] or "")
    }
    actions = con.execute("SELECT a.status, a.decision_id FROM actions a").fetchall()
    sid = json.loads(con.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()[0])
    runs = Counter(ran.read_text().split()) if ran.exists() else Counter()
    done_keys = [f"{sid}-{d}" for s, d in actions if s == "done"]
    logged = [
        json.loads(x)["decision_id"] for x in (state / "rejects.jsonl").read_text().splitlines()
    ]
    return {
        "good_layers": len(written["good"]),
        "good_lost": len(lost),
        "lost_examples": {rel: layers.get(rel) for rel in lost[:5]},  # (status, error) or None
        "bad_files": len(written["bad"]),
        "bad_not_recorded_once_with_reason": len(wrong),
        "wrong_examples": dict(list(wrong.items())[:5]),
        "decisions": con.execute("SELECT COUNT(*) FROM decisions").fetchone()[0],
        "actions": len(actions),
        "action_runs": sum(runs.values()),
        "actions_run_twice": sum(1 for n in runs.values() if n > 1),
        "actions_done_not_run_once": sum(1 for k in done_keys if runs[k] != 1),
        "actions_may_have_run": sum(1 for s, _ in actions if s == "unknown"),
        "actions_open": sum(1 for s, _ in actions if s in ("pending", "running")),
        "reject_log_records": len(logged),
        "reject_log_duplicates": len(logged) - len(set(logged)),
        "reject_log_missing": len(
            {r[0] for r in con.execute("SELECT id FROM decisions")} - set(logged)
        ),
    }


def memory_at_budget(model: Path, work: Path, n: int = 8) -> dict:
    """Peak RSS of a watcher scoring ``n`` layers each right at the default decode budget
    (16-bit colour PNGs of ``max_image_bytes`` decoded), against the documented bound."""
    from inspect3d.watch.config import WatchConfig
    from inspect3d.watch.scoring import DECODE_THREADS, Limits, decode_memory_bound

    cfg = WatchConfig(model=str(model), inbox="-", state="-")
    side = int((cfg.max_image_bytes / 6) ** 0.5)  # 3 channels x 2 bytes
    rng = np.random.default_rng(0)
    image = (rng.random((side, side, 3)) * 4095).astype(np.uint16)  # a file under the limit
    data = cv2.imencode(".png", image)[1].tobytes()
    inbox, state = work / "inbox-mem", work / "state-mem"
    for i in range(n):
        (inbox / "p" / "j").mkdir(parents=True, exist_ok=True)
        (inbox / "p" / "j" / f"layer_{i:04d}.png").write_bytes(data)
    cmd = [sys.executable, "-m", "inspect3d.cli", "watch", f"model={model}", f"inbox={inbox}",
           f"state={state}", "settle_s=0", "until_idle=true"]  # fmt: skip
    rc, rss, err = run_watcher(cmd, None)
    if rc != 0:
        raise RuntimeError(f"watcher exited {rc}: {err}")
    with sqlite3.connect(state / "watch.db") as con:
        scored = con.execute("SELECT COUNT(*) FROM layers WHERE status = 'scored'").fetchone()[0]
    limits = Limits(cfg.max_pixels, cfg.max_image_bytes)
    return {
        "layers_at_budget": n, "scored": scored, "image": f"{side}x{side} 16-bit RGB",
        "file_bytes": len(data), "decode_threads": DECODE_THREADS,
        "decode_bound_mb": round(decode_memory_bound(limits) / 1e6),
        "peak_rss_mb": round(rss / 1024),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--printers", type=int, default=4)
    p.add_argument("--kills", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory", action="store_true", help="peak RSS at the decode budget only")
    p.add_argument("--life-max", type=float, default=3.0, help="longest life before a kill, s")
    args = p.parse_args()
    plan = (args.rounds, args.printers, args.kills, args.seed)
    if args.memory:
        with tempfile.TemporaryDirectory(prefix="watch-mem-") as work:
            print(json.dumps(memory_at_budget(args.model, Path(work)), indent=2))
        return
    with tempfile.TemporaryDirectory(prefix="watch-soak-") as work:
        counts = soak(args.model, args.data, Path(work), plan, (0.6, args.life_max))
    print(json.dumps(counts, indent=2))


if __name__ == "__main__":
    main()
