"""The watcher loop: poll the inbox, score new layers in batches, decide per job, record.

One iteration (``Watcher.step``):
1. poll the inbox for stable new files (all printers together);
2. score up to ``batch_size`` of them in one onnxruntime call; files that may still be being
   written go back to the scanner;
3. the job book (``jobbook``), in ONE transaction: record each layer (scored or failed),
   open/close jobs, run the policy and record the decisions it makes (exactly once: see
   ``inspect3d.watch.store``);
4. the job book ends jobs on their marker file or when idle (final verdict);
5. the outbox (``outbox``): reject log, review evidence, actions; health in the ``meta`` table.

The loop itself (this module) holds the locks, the signals, the model and its reload, and the
health; anything unexpected in a step is logged and recorded, and the step is retried.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import signal
import socket
import threading
import time
from logging.handlers import RotatingFileHandler
from pathlib import Path

from inspect3d.data.layout import compile_inbox_pattern
from inspect3d.errors import InspectError
from inspect3d.infer.model import OnnxModel, chunks, started_ahead
from inspect3d.infer.providers import check_available
from inspect3d.watch.config import WatchConfig
from inspect3d.watch.db import open_store
from inspect3d.watch.inbox import Arrival, InboxScanner
from inspect3d.watch.jobbook import JobBook, ModelStamp
from inspect3d.watch.outbox import Outbox
from inspect3d.watch.scoring import LayerResult, Limits, start_batch
from inspect3d.watch.store import Store

log = logging.getLogger(__name__)
LOG_NAME, LOCK_NAME = "watch.log", "watch.lock"
INBOX_LOCK = ".inspect3d-watch.lock"
RELOAD_REQUEST = "reload.request"
# batches of a backlog scored in one step (one inbox poll), each decoded during the one before
STEP_BATCHES = 8


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
        self.limits = Limits(cfg.max_pixels, cfg.max_image_bytes, cfg.incomplete_tries)
        self.scanner = InboxScanner(
            self.inbox, compile_inbox_pattern(cfg.pattern), cfg.marker, cfg.settle_s,
            cfg.incomplete_s,
        )  # fmt: skip
        self.store: Store | None = None
        self.model: OnnxModel | None = None
        self.model_sha = ""
        self.book: JobBook | None = None
        self.outbox: Outbox | None = None
        # ended jobs' folders are not listed, but on the first poll: a file there that a crash
        # left unrecorded (e.g. one that waited to be complete) is recorded once, with its reason
        self._listed_all = False
        self._locks: list[int] = []
        self._health: dict = {}

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
            self.store = self._open_store()
            self._load_model()
            self._open_inbox(create_inbox)
            self._locks.append(acquire_lock(self.inbox / INBOX_LOCK, f"inbox {str(self.inbox)!r}"))
            self._start_parts()
        except BaseException:
            if self.store is not None:
                self.store.close()
            self._release()
            raise
        return self

    def _open_store(self) -> Store:
        """SQLite in the state folder, or the plant's PostgreSQL (this cell's rows only)."""
        store = open_store(self.state, self.cfg.db, self.cfg.cell, create=True)
        if self.cfg.db is not None:
            try:
                store.hold_cell()
            except BaseException:
                store.close()
                raise
        return store

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
        self.outbox = Outbox(self.store, self.cfg, (self.inbox, self.state), self._error)
        self.book = JobBook(self.store, self.cfg, self.outbox.actions.names(), self._error)
        self.book.model = self._stamp()
        self.book.replay_open_jobs()
        self.outbox.start()
        self._try_meta(
            inbox=str(self.inbox), state=str(self.state), cell=self.cfg.cell or "",
            pid=os.getpid(), host=socket.gethostname(), started_at=time.time(), stopped_at=None,
        )  # fmt: skip
        log.info(
            "watching %s (state %s, history %s, model %s)",
            self.inbox, self.state, self.store.where, self.model_sha[:12],
        )  # fmt: skip

    def _try_meta(self, **values: object) -> None:
        """Health values: a failure (disk full) is logged, not fatal; written again later."""
        try:
            self.store.set_meta(**values)
        except self.store.errors as exc:
            log.error("cannot write health to the store: %s", exc)

    def _load_model(self) -> None:
        """(Re)load the model; the file's hash names the model on every layer it scores."""
        check_available(self.cfg.provider)  # a missing provider is named as such
        model = OnnxModel.load(  # no spinning: an idle watcher leaves the cores alone
            self.model_path, self.cfg.provider, self.cfg.policy.threshold, self.cfg.threads, False
        )
        # after load: a missing file gets the clear error above; model.path: the file that
        # scores (an int8 model gives way to its fp32 model where int8 does not pay)
        sha = file_sha256(model.path)
        self.model, self.model_sha = model, sha
        if self.book is not None:
            self.book.model = self._stamp()
        self._try_meta(
            model=model.path, model_sha=sha, model_name=model.meta.model_name,
            provider=model.runtime, threshold=model.threshold,
            map_threshold=model.map_threshold, roi=model.meta.roi,
            policy=self.cfg.policy.version(),
        )  # fmt: skip

    def _stamp(self) -> ModelStamp:
        meta = self.model.meta
        info = {"path": self.model.path, "sha256": self.model_sha,
                "name": meta.model_name, "config_hash": meta.config_hash}  # fmt: skip
        return ModelStamp(info, self.model.threshold, self.model.map_threshold, meta.roi)

    def close(self) -> None:
        try:
            self.outbox.close()
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
                self._error("step", f"{type(exc).__name__}: {exc}")
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
        return not self.scanner.waiting and not self.outbox.busy

    def step(self, now: float | None = None) -> bool:
        """One iteration; True when it did something (files scored, markers handled)."""
        self._maybe_reload()
        self.store.ensure_connected()  # raises while a database server is down: retried
        if self.store.reconnected:  # the last batch may or may not be committed: read it back
            self.store.reconnected = False
            self.book.reload()
        skip = frozenset(self.book.ended_dirs) if self._listed_all else frozenset()
        arrivals = self.scanner.poll(self.book.known, now, skip)
        self._listed_all = True
        self._note_scan_error()
        layers = [a for a in arrivals if not a.marker][: self.cfg.batch_size * STEP_BATCHES]
        done, retry = self._score_and_record(layers)
        rest = {(a.printer, a.job) for a in arrivals if not a.marker and a.rel not in done}
        rest |= retry | self.scanner.waiting  # end a job only once all its files are in
        markers = [a for a in arrivals if a.marker and (a.printer, a.job) not in rest]
        self.book.end_jobs(markers, time.time() if now is None else now)
        self.outbox.flush()
        self._update_health(len(arrivals) - len(done) - len(markers))
        return bool(done or markers)

    def _score_and_record(self, layers: list[Arrival]) -> tuple[set[str], set[tuple[str, str]]]:
        """Score and record ``layers`` in batches: the next batch is decoded and scored while
        this one is recorded; a stop request ends it after the batch in hand. Returns the
        layers handled (recorded or handed back to the scanner) and the jobs that wait for a
        file handed back."""
        done, retry = set(), set()
        batches = chunks(layers, self.cfg.batch_size)
        start = functools.partial(start_batch, self.model, inbox=self.inbox, limits=self.limits)
        with contextlib.closing(started_ahead(batches, start)) as ahead:
            for batch, started in ahead:  # on a stop the next batch, scored or not, is dropped
                results = started[-1].result()
                retry |= self._defer(results)
                self.book.record([r for r in results if r.status != "retry"])
                done |= {a.rel for a in batch}
                if self.stop_requested.is_set():
                    break
        return done, retry

    def _defer(self, results: list[LayerResult]) -> set[tuple[str, str]]:
        """Files that may still be being written go back to the scanner; their jobs wait."""
        jobs = set()
        for r in results:
            if r.status == "retry":
                self.scanner.defer(r.arrival, r.error or "incomplete")
                jobs.add((r.arrival.printer, r.arrival.job))
        return jobs

    # --- errors and health ----------------------------------------------------------------------
    def _error(self, source: str, message: str) -> None:
        """Logged, and recorded for ``status`` unless the database itself is the problem."""
        log.error("%s: %s", source, message)
        with contextlib.suppress(*self.store.errors):
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
        return summary(Path(cfg.state), cfg.db, cfg.cell if cfg.db else None)
    finally:
        logging.getLogger("inspect3d").removeHandler(handler)
        handler.close()
