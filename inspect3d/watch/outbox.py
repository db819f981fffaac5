"""The outbox: what a committed decision causes outside the database, driven by its flags.

After each step: decisions not yet in the reject log are appended to it (``logged``), flagged
layers are linked into the review folder with their overlays (``evidence``), and pending
actions are started, each at most once (the intent is committed first: see
``inspect3d.watch.actions``). A crash in between redoes the log and evidence steps (the log is
de-duplicated by decision id) and turns an action that was running into 'unknown'.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from inspect3d.data.layout import text_name
from inspect3d.watch import journal
from inspect3d.watch.actions import ActionRunner
from inspect3d.watch.config import WatchConfig
from inspect3d.watch.store import Store, decode_map

log = logging.getLogger(__name__)
REJECTS_NAME = "rejects.jsonl"


class Outbox:
    """Reject log, review evidence and actions of the decisions in ``store``."""

    def __init__(
        self,
        store: Store,
        cfg: WatchConfig,
        folders: tuple[Path, Path],
        errors: Callable[[str, str], None],
    ) -> None:
        self.store, self.cfg, self.errors = store, cfg, errors
        self.inbox, self.state = folders
        self.rejects = journal.RejectLog(self.state / REJECTS_NAME)
        self.actions = ActionRunner(cfg.actions, self._store_id())

    def start(self) -> None:
        """Report what a crash left behind: broken log records, actions that may have run."""
        if self.rejects.broken:
            self.errors(
                "reject-log", f"{self.rejects.broken} broken record(s) of {self.rejects.path} "
                f"moved to {self.rejects.broken_path}",
            )  # fmt: skip
        try:
            ids = self.store.interrupted_actions()
        except self.store.errors as exc:
            log.error("cannot check for interrupted actions: %s", exc)
            return
        for aid in ids:
            self.errors("action", f"action {aid} was running when the watcher stopped: "
                        "it may have run (not run again)")  # fmt: skip

    def _store_id(self) -> str:
        try:
            return self.store.store_id()
        except self.store.errors as exc:  # e.g. disk full at start
            log.error("cannot write the store id (%s); actions keyed without it", exc)
            return "unsaved"

    @property
    def busy(self) -> bool:
        return bool(self.actions.running)

    def flush(self) -> None:
        self._log()
        self._evidence()
        self._start_actions()
        self.drain()

    def _log(self) -> None:
        """Append the decisions not yet in the reject log, all in one synced write."""
        rows = self.store.unlogged()
        try:
            written = self.rejects.append([row.record for row in rows])
        except OSError as exc:  # e.g. disk full: the records stay pending and are retried
            self.errors("reject-log", f"cannot write {self.rejects.path}: {exc}")
            return
        for record in written:
            log.warning("%s", journal.describe(record))
        self.store.set_flags([row.id for row in rows], "logged")

    def _evidence(self) -> None:
        done = []
        for row in self.store.without_evidence():
            layers = row.record["reason"].get("layers") or []
            if self.cfg.review and row.kind != "FINAL" and layers:
                rows = self.store.layer_rows(row.job_id, layers)
                pairs = [(self.inbox / text_name(r.rel), decode_map(r)) for r in rows]
                for problem in journal.save_evidence(self.state / "review", row.record, pairs):
                    self.errors("evidence", problem)
            done.append(row.id)
        self.store.set_flags(done, "evidence")

    def _start_actions(self) -> None:
        """Start pending actions, each once: the intent is committed before it runs."""
        for action in self.store.pending_actions():
            if self.store.start_action(action.id):
                self.actions.submit(action.id, action.name, action.record)

    def drain(self) -> None:
        """Record the outcomes of the actions that finished."""
        for action_id, status, attempts, error in self.actions.results():
            self.store.finish_action(action_id, status, attempts, error)
            if error is not None:
                self.errors(
                    "action", f"action {action_id} {status} after {attempts} tries: {error}"
                )

    def close(self) -> None:
        """Wait for running actions (``timeout_s``); ones that never started stay pending."""
        cancelled = self.actions.close(wait_s=self.cfg.actions.timeout_s)
        with contextlib.suppress(*self.store.errors):
            for aid in cancelled:
                self.store.unstart_action(aid)
            self.drain()
