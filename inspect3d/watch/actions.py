"""Actions on decisions: run a command and/or POST a webhook, off the scoring thread.

Each pending action (a row in the ``actions`` table, written with its decision) is marked
'running' in the database before it starts (the intent is committed), then runs in a small
thread pool with a timeout and retries; the outcome comes back through ``results`` and the
service records it. A crash in between leaves it 'running', which the next start turns into
'unknown' (it may have run) instead of running it again: at most once per decision and level.
Every run carries an idempotency key (``<store id>-<decision id>``, the same for every retry) in
``INSPECT3D_IDEMPOTENCY_KEY`` and the ``Idempotency-Key`` header, so a receiver can drop a repeat
of a retry whose first answer was lost.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor

from inspect3d.watch.config import ActionConfig


def run_command(argv: list[str], record: dict, timeout_s: float, key: str) -> None:
    """Run ``argv`` with the decision as JSON on stdin and in ``INSPECT3D_*`` variables."""
    env = {
        **os.environ,
        "INSPECT3D_DECISION": json.dumps(record),
        "INSPECT3D_DECISION_ID": str(record["decision_id"]),
        "INSPECT3D_IDEMPOTENCY_KEY": key,
        "INSPECT3D_VERDICT": record["verdict"],
        "INSPECT3D_PRINTER": record["printer"],
        "INSPECT3D_JOB": record["job"],
    }
    r = subprocess.run(
        argv, input=json.dumps(record), text=True, env=env, timeout=timeout_s, capture_output=True
    )
    if r.returncode != 0:
        raise RuntimeError(f"command {argv!r} exited {r.returncode}: {r.stderr.strip()[-300:]}")


def post_webhook(url: str, record: dict, timeout_s: float, key: str) -> None:
    """POST the decision as JSON; any non-2xx answer is a failure."""
    headers = {"Content-Type": "application/json", "Idempotency-Key": key}
    req = urllib.request.Request(url, data=json.dumps(record).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 (configured URL)
        if not 200 <= resp.status < 300:
            raise RuntimeError(f"webhook {url} answered {resp.status}")


def with_retries(fn, cfg: ActionConfig) -> tuple[str, int, str | None]:
    """Call ``fn`` up to 1 + retries times: (status 'done'|'failed', attempts, last error)."""
    error = None
    for attempt in range(1, cfg.retries + 2):
        try:
            fn()
            return "done", attempt, None
        except Exception as exc:  # recorded; never raised into the watcher
            error = f"{type(exc).__name__}: {exc}"
            if attempt <= cfg.retries:
                time.sleep(cfg.backoff_s * 2 ** (attempt - 1))
    return "failed", cfg.retries + 1, error


class ActionRunner:
    """Runs actions in background threads; ``results()`` hands back finished outcomes."""

    def __init__(self, cfg: ActionConfig, store_id: str = "") -> None:
        self.cfg, self.store_id = cfg, store_id
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="inspect3d-action")
        self.running: dict[int, Future] = {}

    def names(self) -> list[str]:
        return [n for n, on in (("command", self.cfg.command), ("webhook", self.cfg.webhook)) if on]

    def key(self, record: dict) -> str:
        """The idempotency key of a decision's actions."""
        return f"{self.store_id}-{record['decision_id']}"

    def submit(self, action_id: int, name: str, record: dict) -> None:
        """Run a started action (its intent already committed) in the background."""
        if action_id in self.running:
            return
        run = run_command if name == "command" else post_webhook
        target = self.cfg.command if name == "command" else self.cfg.webhook
        args = (target, record, self.cfg.timeout_s, self.key(record))
        self.running[action_id] = self.pool.submit(with_retries, lambda: run(*args), self.cfg)

    def results(self) -> list[tuple[int, str, int, str | None]]:
        """(action id, status, attempts, error) of the actions finished since the last call."""
        done = [aid for aid, fut in self.running.items() if fut.done()]
        return [(aid, *self.running.pop(aid).result()) for aid in done]

    def close(self, wait_s: float = 0.0) -> list[int]:
        """Wait up to ``wait_s`` for running actions; the ids of those cancelled before they
        started (to be put back to pending) are returned."""
        deadline = time.time() + wait_s
        while any(not f.done() for f in self.running.values()) and time.time() < deadline:
            time.sleep(0.05)
        cancelled = [aid for aid, fut in self.running.items() if fut.cancel()]
        for aid in cancelled:
            del self.running[aid]
        self.pool.shutdown(wait=False, cancel_futures=True)
        return cancelled
