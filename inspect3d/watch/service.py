"""The watcher loop: poll the inbox, score new layers in batches, decide per job, record.

One iteration (``Watcher.step``):
1. poll the inbox for stable new files (all printers together);
2. score up to ``batch_size`` of them in one onnxruntime call;
3. in ONE transaction: record each layer (scored or failed), open/close jobs, run the policy and
   record the decisions it makes (exactly once: see ``inspect3d.watch.store``);
4. end jobs on their marker file or when idle (final verdict);
5. outbox: reject log, review evidence, actions; health in the ``meta`` table.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import signal
import sqlite3
import threading
import time
from dataclasses import replace
from datetime import datetime, timezone
from logging.handlers import RotatingFileHandler
from pathlib import Path

from inspect3d.data.layout import compile_inbox_pattern, text_name
from inspect3d.errors import InspectError
from inspect3d.infer.model import OnnxModel
from inspect3d.infer.providers import check_available
from inspect3d.watch import journal
from inspect3d.watch.actions import ActionRunner
from inspect3d.watch.config import WatchConfig
from inspect3d.watch.inbox import Arrival, InboxScanner
from inspect3d.watch.policy import Decision, JobState, LayerObs, replay, step
from inspect3d.watch.scoring import LayerResult, Limits, score_batch
from inspect3d.watch.store import Store, decode_map

log = logging.getLogger(__name__)
DB_NAME, LOG_NAME, REJECTS_NAME, LOCK_NAME = "watch.db", "watch.log", "rejects.jsonl", "watch.lock"
INBOX_LOCK = ".inspect3d-watch.lock"
RELOAD_REQUEST = "reload.request"
# errors of the store itself (disk full, locked, I/O): the whole step is retried later
STORE_ERRORS = (sqlite3.OperationalError, OSError)


def absolute(path: str | Path) -> Path:
    """``path`` made absolute against the working directory now (``~`` expanded)."""
    return Path(os.path.abspath(Path(path).expanduser()))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def acquire_lock(path: Path, what: str) -> int:
    """Hold an exclusive ``flock`` on ``path`` (released by the OS even on kill -9)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise InspectError(
            f"another watcher (pid {holder}) already watches {what}: {str(path)!r} is locked; "
            "stop it first, or give this one another inbox and state"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


class Watcher:
    """A running watcher over one inbox; ``run()`` until stopped (or drained with until_idle)."""

    def __init__(self, cfg: WatchConfig) -> None:
        self.cfg = cfg
        # absolute from the start: the store keeps them, and report/review read them from any
        # working directory (symlinks kept as typed: a mount point stays the mount point)
        self.inbox, self.state = absolute(cfg.inbox), absolute(cfg.state)
        self.model_path = absolute(cfg.model)
        self.stop_requested = threading.Event()
        self.reload_requested = threading.Event()
        self.states: dict[int, JobState] = {}
        self.ended_dirs: set[str] = set()  # folders of ended jobs: not listed any more...
        # ...but on the first poll: a file there that a crash left unrecorded (e.g. one that
        # waited to be complete) is recorded once, with its reason
        self._listed_all = False
        self._closing: list[int] = []
        self._locks: list[int] = []
        self._health: dict = {}
        self.stuck_jobs: set[int] = set()  # jobs whose end failed unexpectedly (logged)

    # --- start / stop --------------------------------------------------------------------------
    def start(self, create_inbox: bool = True) -> Watcher:
        """Take the locks, open the store, load the model, replay open jobs' policy state.

        ``create_inbox=False`` (``inspect3d watch``): a missing inbox is an error, so a mistyped
        path is not watched forever; code embedding a watcher may let it create the inbox.
        """
        self._refuse_state_in_inbox()
        self.state.mkdir(parents=True, exist_ok=True)
        self._locks.append(acquire_lock(self.state / LOCK_NAME, f"state {str(self.state)!r}"))
        try:
            self.store = Store(self.state / DB_NAME)
            self._load_model()
            self._open_inbox(create_inbox)
            self._locks.append(acquire_lock(self.inbox / INBOX_LOCK, f"inbox {str(self.inbox)!r}"))
            self._start_parts()
        except BaseException:
            if hasattr(self, "store"):
                self.store.close()
            self._release()
            raise
        return self

    def _refuse_state_in_inbox(self) -> None:
        real = Path(os.path.realpath(self.state))
        if real.is_relative_to(os.path.realpath(self.inbox)):
            raise InspectError(
                f"state {str(self.cfg.state)!r} ({self.state}) is inside the inbox "
                f"{str(self.cfg.inbox)!r}: its files would be taken for layers; give a state "
                "folder beside the inbox, e.g. state=" + str(self.inbox.parent / "watch-state")
            )

    def _open_inbox(self, create: bool) -> None:
        if create:
            self.inbox.mkdir(parents=True, exist_ok=True)
        elif not self.inbox.is_dir():
            what = "is not a folder" if self.inbox.exists() else "does not exist"
            raise InspectError(
                f"inbox {str(self.cfg.inbox)!r} ({self.inbox}) {what}: give the folder the "
                f"printers write into, or create it first (mkdir -p {self.inbox})"
            )

    def _start_parts(self) -> None:
        self.pattern = compile_inbox_pattern(self.cfg.pattern)
        self.known = self.store.known_rels()
        self.ended_dirs.update(self.store.job_dirs(None))
        self.scanner = InboxScanner(
            self.inbox, self.pattern, self.cfg.marker, self.cfg.settle_s, self.cfg.incomplete_s
        )
        self.limits = Limits(
            self.cfg.max_pixels, self.cfg.max_image_bytes, self.cfg.incomplete_tries
        )
        self.rejects = journal.RejectLog(self.state / REJECTS_NAME)
        if self.rejects.broken:
            self._try_record(
                "reject-log",
                f"{self.rejects.broken} broken record(s) of {self.rejects.path} "
                f"moved to {self.rejects.broken_path}",
            )
        self.actions = ActionRunner(self.cfg.actions, self._store_id())
        for job in self.store.open_jobs():
            self.states[job["id"]] = replay(self.store.job_obs(job["id"]), *self._policy())[0]
        self._recover_actions()
        self._try_meta(
            inbox=str(self.inbox), pid=os.getpid(), started_at=time.time(), stopped_at=None
        )
        log.info("watching %s (state %s, model %s)", self.inbox, self.state, self.model_sha[:12])

    def _store_id(self) -> str:
        try:
            return self.store.store_id()
        except sqlite3.Error as exc:  # e.g. disk full at start: actions wait for a key
            log.error("cannot write the store id (%s); actions keyed without it", exc)
            return "unsaved"

    def _recover_actions(self) -> None:
        try:
            ids = self.store.interrupted_actions()
        except sqlite3.Error as exc:
            log.error("cannot check for interrupted actions: %s", exc)
            return
        for aid in ids:
            self._try_record("action", f"action {aid} was running when the watcher stopped: "
                             "it may have run (not run again)")  # fmt: skip

    def _try_meta(self, **values: object) -> None:
        """Health values: a failure (disk full) is logged, not fatal; written again later."""
        try:
            self.store.set_meta(**values)
        except sqlite3.Error as exc:
            log.error("cannot write health to the store: %s", exc)

    def _policy(self):
        return self.cfg.policy, self.model.threshold

    def _load_model(self) -> None:
        """(Re)load the model; the file's hash names the model on every layer it scores."""
        check_available(self.cfg.provider)  # a missing provider is named as such
        model = OnnxModel.load(  # no spinning: an idle watcher leaves the cores alone
            self.model_path, self.cfg.provider, self.cfg.policy.threshold, self.cfg.threads, False
        )
        sha = file_sha256(self.model_path)  # after load: a missing file gets the clear error above
        self.model, self.model_sha = model, sha
        self._try_meta(
            model=str(self.model_path), model_sha=sha, model_name=model.meta.model_name,
            provider=model.providers[0], threshold=model.threshold,
            map_threshold=model.map_threshold, roi=model.meta.roi,
            policy=self.cfg.policy.version(),
        )  # fmt: skip

    def close(self) -> None:
        try:
            cancelled = self.actions.close(wait_s=self.cfg.actions.timeout_s)
            with contextlib.suppress(sqlite3.Error):
                for aid in cancelled:
                    self.store.unstart_action(aid)
                self._drain_actions()
            self._try_meta(stopped_at=time.time())
        finally:
            self.store.close()
            self._release()

    def _release(self) -> None:
        while self._locks:
            os.close(self._locks.pop())

    # --- the loop -------------------------------------------------------------------------------
    def run(self) -> None:
        """Loop until SIGINT/SIGTERM (finishing the batch in hand) or, with until_idle, drained."""
        self._install_signals()
        while not self.stop_requested.is_set():
            try:
                busy = self.step()
            except Exception as exc:  # disk full, or anything unexpected: never fatal
                log.exception("watcher step failed; retrying")
                self._try_record("step", f"{type(exc).__name__}: {exc}")
                self.stop_requested.wait(max(1.0, self.cfg.poll_s))
                continue
            if self.cfg.until_idle and not busy and self._drained():
                break
            if not busy:
                self.stop_requested.wait(self.cfg.poll_s)
        log.info("watcher stopped")

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop_requested.set())
        signal.signal(signal.SIGHUP, lambda *_: self.reload_requested.set())

    def _drained(self) -> bool:
        return not self.scanner.waiting and not self.actions.running

    def step(self, now: float | None = None) -> bool:
        """One iteration; True when it did something (files scored, markers handled)."""
        self._maybe_reload()
        skip = frozenset(self.ended_dirs) if self._listed_all else frozenset()
        arrivals = self.scanner.poll(self.known, now, skip)
        self._listed_all = True
        self._note_scan_error()
        layers = [a for a in arrivals if not a.marker][: self.cfg.batch_size]
        results = score_batch(self.model, layers, self.inbox, self.limits) if layers else []
        self._commit(results)
        rest = {(a.printer, a.job) for a in arrivals[len(layers) :] if not a.marker}
        rest |= {(r.arrival.printer, r.arrival.job) for r in results if r.status == "retry"}
        rest |= self.scanner.waiting  # end a job only once all its files are in
        markers = [a for a in arrivals if a.marker and (a.printer, a.job) not in rest]
        self._end_jobs(markers, now)
        self._flush_outbox()
        self._update_health(len(arrivals) - len(layers) - len(markers))
        return bool(layers or markers)

    # --- recording a batch ---------------------------------------------------------------------
    def _commit(self, results: list[LayerResult]) -> None:
        """Record a scored batch in one transaction; files that may still be being written go
        back to the scanner. Anything unexpected stays with the layer that caused it."""
        for r in results:
            if r.status == "retry":
                self.scanner.defer(r.arrival, r.error or "incomplete")
        todo = [r for r in results if r.status != "retry"]
        if not todo:
            return
        try:
            self._commit_batch(todo)
        except STORE_ERRORS:
            raise  # the store itself (disk full, locked): the step is retried as a whole
        except Exception:
            log.exception("a batch of %d layers cannot be recorded; one by one", len(todo))
            for r in todo:
                self._commit_alone(r)

    def _commit_alone(self, r: LayerResult) -> None:
        try:
            return self._commit_batch([r])
        except STORE_ERRORS:
            raise
        except Exception as exc:
            why = f"{r.arrival.rel!r} cannot be recorded as it is: {type(exc).__name__}: {exc}"
        self._error("layer", why)
        failed = LayerResult(replace(r.arrival, layer=None), "failed", r.sha256, error=why)
        try:
            self._commit_batch([failed])
        except STORE_ERRORS:
            raise
        except Exception as exc:
            self._error("layer", f"{why}; nor as failed ({exc}): skipped until restart")
            self.known.add(r.arrival.rel)

    def _commit_batch(self, results: list[LayerResult]) -> None:
        now, states = time.time(), dict(self.states)
        committed = False
        try:
            with self.store.transaction():
                for r in results:
                    self._record(r, states, now)
            committed = True
        finally:
            self._closed(committed)
        self.states = states
        self.known.update(r.arrival.rel for r in results)
        for r in results:
            if r.status == "failed":
                log.warning("layer failed: %s", r.error)

    def _record(self, r: LayerResult, states: dict[int, JobState], now: float) -> None:
        a = r.arrival
        job = self.store.job(a.printer, a.job)
        if job is None:
            self._finish_printer_jobs(a.printer, states, now)
            job_id = self.store.open_job(a.printer, a.job, now)
            states[job_id] = JobState()
        elif job["status"] != "open":
            job_id = job["id"]
            ended = f"job {a.job!r} of printer {a.printer!r} already ended ({job['end_reason']})"
            r.error = ended if r.status != "failed" else f"{r.error}; {ended}"
            r.status, r.score = "failed", None
        else:
            job_id = job["id"]
        layer = a.layer if a.layer is not None else self.store.n_layers(job_id) + 1
        self.store.insert_layer(job_id, layer, r, self.model_sha, now)
        if r.status == "scored":
            obs = LayerObs.of(layer, r.score)
            self._apply_policy(job_id, a, obs, states, now)
        if job is None or job["status"] == "open":
            self.store.touch_job(job_id, now, states.get(job_id, JobState()).level)

    def _apply_policy(
        self, job_id: int, a: Arrival, obs: LayerObs, states: dict[int, JobState], now: float
    ) -> None:
        state, decision = step(states.get(job_id, JobState()), obs, *self._policy())
        states[job_id] = state
        if decision is not None:
            self._decide(job_id, a.printer, a.job, decision.level, decision, decision.reason(), now)

    def _decide(
        self,
        job_id: int,
        printer: str,
        job: str,
        verdict: str,
        d: Decision | None,
        reason: dict,
        now: float,
    ) -> None:
        kind = "FINAL" if d is None else verdict
        record = {
            "time": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds"),
            "kind": kind, "verdict": verdict, "printer": printer, "job": job, "reason": reason,
            "model": self._model_info(),
            "policy": self.cfg.policy.version(), "threshold": self.model.threshold,
            "map_threshold": self.model.map_threshold, "roi": self.model.meta.roi,
        }  # fmt: skip
        did = self.store.add_decision(job_id, kind, verdict, record, now)
        trigger = verdict if kind != "FINAL" else f"FINAL_{verdict}"
        if did is not None and trigger in self.cfg.actions.levels:
            for name in self.actions.names():
                self.store.add_action(did, name)

    def _model_info(self) -> dict:
        meta = self.model.meta
        return {
            "path": str(self.model_path),
            "sha256": self.model_sha,
            "name": meta.model_name,
            "config_hash": meta.config_hash,
        }

    # --- ending jobs ----------------------------------------------------------------------------
    def _finish_printer_jobs(self, printer: str, states: dict[int, JobState], now: float) -> None:
        for job in self.store.open_jobs():
            if job["printer"] == printer:
                self._finalize(job, "next_job", states, now)

    def _finalize(self, job, ended_by: str, states: dict[int, JobState], now: float) -> None:
        """Write the job's final verdict and close it (inside a transaction)."""
        obs = self.store.job_obs(job["id"])
        state = states.pop(job["id"], None) or replay(obs, *self._policy())[0]
        n_all = self.store.n_layers(job["id"])
        reason = {
            "ended_by": ended_by, "first_bad_layer": state.first_bad, "layers_scored": len(obs),
            "layers_failed": n_all - len(obs),
            "max_score": max((o.score for o in obs), default=None),
            "layers": [o.layer for o in state.window if o.score >= self.model.threshold],
        }  # fmt: skip
        self._decide(job["id"], job["printer"], job["name"], state.level, None, reason, now)
        self.store.close_job(job["id"], ended_by, now)
        self._closing.append(job["id"])

    def _closed(self, committed: bool) -> None:
        """After a transaction: stop listing the folders of the jobs it ended."""
        for job_id in self._closing if committed else []:
            self.ended_dirs.update(self.store.job_dirs(job_id))
        self._closing = []

    def _end_jobs(self, markers: list[Arrival], now: float | None) -> None:
        now = time.time() if now is None else now
        ends = [(m.printer, m.job, "marker") for m in markers]
        ends += [
            (j["printer"], j["name"], "idle")
            for j in self.store.open_jobs()
            if now - j["last_at"] >= self.cfg.idle_s and j["id"] not in self.stuck_jobs
        ]
        if not ends:
            return
        try:
            self._end_batch(ends, now)
        except STORE_ERRORS:
            raise
        except Exception:
            log.exception("%d job ends cannot be recorded together; one by one", len(ends))
            for end in ends:
                self._end_alone(end, now)
        self.known.update(m.rel for m in markers)

    def _end_alone(self, end: tuple[str, str, str], now: float) -> None:
        try:
            self._end_batch([end], now)
        except STORE_ERRORS:
            raise
        except Exception as exc:
            job = self.store.job(end[0], end[1])
            if job is not None:
                self.stuck_jobs.add(job["id"])
            self._error(
                "job", f"job {end[1]!r} of printer {end[0]!r} cannot be ended ({end[2]}): "
                f"{type(exc).__name__}: {exc}; left open until restart",
            )  # fmt: skip

    def _end_batch(self, ends: list[tuple[str, str, str]], now: float) -> None:
        states = dict(self.states)
        committed = False
        try:
            with self.store.transaction():
                for printer, name, ended_by in ends:
                    job = self.store.job(printer, name)
                    if job is not None and job["status"] == "open":
                        self._finalize(job, ended_by, states, now)
            committed = True
        finally:
            self._closed(committed)
        self.states = states

    # --- after the commit: log, evidence, actions, health ---------------------------------------
    def _flush_outbox(self) -> None:
        done = []
        try:
            for row in self.store.unlogged():
                record = json.loads(row["record"])
                if self.rejects.append(record):
                    log.warning("%s", journal.describe(record))
                done.append(row["id"])
        except OSError as exc:  # e.g. disk full: the record stays pending and is retried
            self._error("reject-log", f"cannot write {self.rejects.path}: {exc}")
        self.store.set_flags(done, "logged")
        self._write_evidence()
        self._run_actions()

    def _write_evidence(self) -> None:
        done = []
        for row in self.store.without_evidence():
            record = json.loads(row["record"])
            layers = record["reason"].get("layers") or []
            if self.cfg.review and record["kind"] != "FINAL" and layers:
                rows = self.store.layer_rows(row["job_id"], layers)
                pairs = [(self.inbox / text_name(r["rel"]), decode_map(r)) for r in rows]
                for problem in journal.save_evidence(self.state / "review", record, pairs):
                    self._error("evidence", problem)
            done.append(row["id"])
        self.store.set_flags(done, "evidence")

    def _run_actions(self) -> None:
        """Start pending actions, each once: the intent is committed before it runs."""
        for row in self.store.pending_actions():
            if self.store.start_action(row["id"]):
                self.actions.submit(row["id"], row["name"], json.loads(row["record"]))
        self._drain_actions()

    def _drain_actions(self) -> None:
        for action_id, status, attempts, error in self.actions.results():
            self.store.finish_action(action_id, status, attempts, error)
            if error is not None:
                self._error(
                    "action", f"action {action_id} {status} after {attempts} tries: {error}"
                )

    def _error(self, source: str, message: str) -> None:
        log.error("%s: %s", source, message)
        self.store.record_error(source, message)

    def _try_record(self, source: str, message: str) -> None:
        with contextlib.suppress(sqlite3.Error):  # the database itself may be the problem
            self.store.record_error(source, message)

    def _note_scan_error(self) -> None:
        err = self.scanner.last_error
        if err is not None and err != self._health.get("scan_error"):
            self._error("inbox", err)
        self._health["scan_error"] = err

    def _update_health(self, queue: int) -> None:
        now = time.time()
        if now - self._health.get("beat", 0) < 2 and (queue == 0) == (
            self._health.get("queue") == 0
        ):
            return  # at most every 2 s (each write is a commit), or when the queue empties
        self._health.update(queue=queue, beat=now)
        self.store.set_meta(queue_depth=queue, waiting=len(self.scanner.waiting), heartbeat=now)

    def _maybe_reload(self) -> None:
        request = self.state / RELOAD_REQUEST
        if not (self.reload_requested.is_set() or request.exists()):
            return
        self.reload_requested.clear()
        request.unlink(missing_ok=True)
        old = self.model_sha
        try:
            self._load_model()
            log.info("model reloaded: %s -> %s", old[:12], self.model_sha[:12])
        except (InspectError, OSError) as exc:
            self._error("reload", f"model reload failed, still using {old[:12]}: {exc}")


def attach_log_file(state: Path, max_bytes: int, backups: int) -> logging.Handler:
    """Readable log ``STATE/watch.log``, rotated at ``max_bytes`` keeping ``backups`` files."""
    state.mkdir(parents=True, exist_ok=True)
    handler = RotatingFileHandler(state / LOG_NAME, maxBytes=max_bytes, backupCount=backups)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("inspect3d")
    logger.addHandler(handler)
    logger.setLevel(min(logger.level or logging.INFO, logging.INFO))
    return handler


def watch(cfg: WatchConfig) -> dict:
    """Run a watcher with ``cfg`` until stopped; returns the final status summary."""
    from inspect3d.watch.status import summary

    handler = attach_log_file(Path(cfg.state), cfg.log_max_bytes, cfg.log_backups)
    try:
        watcher = Watcher(cfg).start(create_inbox=False)
        try:
            watcher.run()
        finally:
            watcher.close()
        return summary(Path(cfg.state))
    finally:
        logging.getLogger("inspect3d").removeHandler(handler)
        handler.close()
