"""The job book: records layers, opens and ends jobs, and decides, each batch in one transaction.

Exactly once (see ``inspect3d.watch.store``): a batch of layers, the jobs it opens or ends and
the decisions they cause are one ``BEGIN IMMEDIATE`` transaction; the policy state of the open
jobs is kept in memory only as a cache of what the store replays on start. Anything unexpected
while recording one layer or ending one job stays with it: the layer is recorded as failed with
the exception (or, if even that fails, skipped until restart), the job is left open; both are
reported through ``errors``. Errors of the store itself (``Store.transient``: disk full, locked)
propagate, so the loop retries the whole step (after a lost connection, from what is committed:
``reload``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from inspect3d.watch.config import WatchConfig
from inspect3d.watch.inbox import Arrival
from inspect3d.watch.policy import Decision, JobState, LayerObs, replay, step
from inspect3d.watch.scoring import LayerResult
from inspect3d.watch.store import JobRow, Store

log = logging.getLogger(__name__)
States = dict[int, JobState]


@dataclass(frozen=True)
class ModelStamp:
    """What every decision and layer records of the model that scored it."""

    info: dict  # path, sha256, name, config_hash
    threshold: float
    map_threshold: float | None
    roi: list | None

    @property
    def sha(self) -> str:
        return self.info["sha256"]


class JobBook:
    """Records batches of layer results and job ends in ``store``; decides per job."""

    def __init__(
        self, store: Store, cfg: WatchConfig, actions: list[str], errors: Callable[[str, str], None]
    ) -> None:
        self.store, self.cfg, self.action_names, self.errors = store, cfg, actions, errors
        self.model: ModelStamp | None = None  # set by the watcher on (re)load
        self.known = store.known_rels()  # relative paths already recorded
        self.ended_dirs = store.job_dirs(None)  # folders of ended jobs: not listed any more
        self.stuck_jobs: set[int] = set()  # jobs whose end failed unexpectedly (logged)
        self.states: States = {}
        self._closing: list[int] = []
        # within one batch's transaction: jobs looked up, and the open jobs' last activity and
        # level, written once per job at the end of the batch instead of once per layer
        self._jobs: dict[tuple[str, str], JobRow] = {}
        self._touched: dict[int, str] = {}

    def reload(self) -> None:
        """Forget the caches and read them again from the store (a lost connection may have
        committed the last batch, or not)."""
        self.known = self.store.known_rels()
        self.ended_dirs = self.store.job_dirs(None)
        self.states = {}
        self.replay_open_jobs()

    def replay_open_jobs(self) -> None:
        """The policy state of the open jobs, from their stored scores (after a restart)."""
        for job in self.store.open_jobs():
            self.states[job.id] = replay(self.store.job_obs(job.id), *self._policy())[0]

    def _policy(self):
        return self.cfg.policy, self.model.threshold

    # --- one transaction ------------------------------------------------------------------------
    def _transaction(self, body: Callable[[States, float], None], now: float) -> None:
        """Run ``body(states, now)`` in one transaction; the policy states and the ended
        folders are taken over only once it is committed."""
        states, committed = dict(self.states), False
        self._jobs, self._touched = {}, {}  # nothing read or pending from a rolled-back one
        try:
            with self.store.transaction():
                body(states, now)
            committed = True
        finally:
            for job_id in self._closing if committed else []:
                self.ended_dirs.update(self.store.job_dirs(job_id))
            self._closing = []
        self.states = states

    # --- layers ---------------------------------------------------------------------------------
    def record(self, results: list[LayerResult]) -> None:
        """Record scored and failed layers in one transaction, one by one if that fails."""
        if not results:
            return
        try:
            self._record_batch(results)
        except self.store.transient:
            raise
        except Exception:
            log.exception("a batch of %d layers cannot be recorded; one by one", len(results))
            for r in results:
                self._record_alone(r)

    def _record_alone(self, r: LayerResult) -> None:
        try:
            return self._record_batch([r])
        except self.store.transient:
            raise
        except Exception as exc:
            why = f"{r.arrival.rel!r} cannot be recorded as it is: {type(exc).__name__}: {exc}"
        self.errors("layer", why)
        failed = LayerResult(replace(r.arrival, layer=None), "failed", r.sha256, error=why)
        try:
            self._record_batch([failed])
        except self.store.transient:
            raise
        except Exception as exc:
            self.errors("layer", f"{why}; nor as failed ({exc}): skipped until restart")
            self.known.add(r.arrival.rel)

    def _record_batch(self, results: list[LayerResult]) -> None:
        def body(states: States, now: float) -> None:
            for r in results:
                self._record(r, states, now)
            for job_id, level in self._touched.items():  # jobs closed in the batch too
                self.store.touch_job(job_id, now, level)

        self._transaction(body, time.time())
        self.known.update(r.arrival.rel for r in results)
        for r in results:
            if r.status == "failed":
                log.warning("layer failed: %s", r.error)

    def _record(self, r: LayerResult, states: States, now: float) -> None:
        a = r.arrival
        job = self._job(a.printer, a.job)
        if job is None:
            self._finish_printer_jobs(a.printer, states, now)
            job_id = self.store.open_job(a.printer, a.job, now)
            states[job_id] = JobState()
        else:
            job_id = job.id
        if job is not None and job.status != "open":
            ended = f"job {a.job!r} of printer {a.printer!r} already ended ({job.end_reason})"
            r.error = ended if r.status != "failed" else f"{r.error}; {ended}"
            r.status, r.score = "failed", None
        layer = a.layer if a.layer is not None else self.store.n_layers(job_id) + 1
        self.store.insert_layer(job_id, layer, r, self.model.sha, now)
        if r.status == "scored":
            self._apply_policy(job_id, a, LayerObs.of(layer, r.score), states, now)
        if job is None or job.status == "open":
            self._touched[job_id] = states.get(job_id, JobState()).level

    def _job(self, printer: str, name: str) -> JobRow | None:
        """The job's row, read once per batch (a job opened in it is read on its next layer)."""
        key = (printer, name)
        if key not in self._jobs:
            job = self.store.job(printer, name)
            if job is None:
                return None
            self._jobs[key] = job
        return self._jobs[key]

    def _apply_policy(
        self, job_id: int, a: Arrival, obs: LayerObs, states: States, now: float
    ) -> None:
        state, decision = step(states.get(job_id, JobState()), obs, *self._policy())
        states[job_id] = state
        if decision is not None:
            self._decide(job_id, (a.printer, a.job), decision, decision.reason(), now)

    def _decide(
        self,
        job_id: int,
        names: tuple[str, str],
        d: Decision | JobState,
        reason: dict,
        now: float,
    ) -> None:
        """Record a decision (``d``: the policy's, or the job's final state) and its actions."""
        kind = "FINAL" if isinstance(d, JobState) else d.level
        m = self.model
        record = {
            "time": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds"),
            "kind": kind, "verdict": d.level, "printer": names[0], "job": names[1],
            "reason": reason, "model": m.info, "policy": self.cfg.policy.version(),
            "threshold": m.threshold, "map_threshold": m.map_threshold, "roi": m.roi,
        }  # fmt: skip
        did = self.store.add_decision(job_id, kind, d.level, record, now)
        trigger = d.level if kind != "FINAL" else f"FINAL_{d.level}"
        if did is not None and trigger in self.cfg.actions.levels:
            for name in self.action_names:
                self.store.add_action(did, name)

    # --- ending jobs ----------------------------------------------------------------------------
    def end_jobs(self, markers: list[Arrival], now: float) -> None:
        """End the jobs whose marker arrived and those idle for ``idle_s``, with a verdict."""
        ends = [(m.printer, m.job, "marker") for m in markers]
        ends += [
            (j.printer, j.name, "idle")
            for j in self.store.open_jobs()
            if now - j.last_at >= self.cfg.idle_s and j.id not in self.stuck_jobs
        ]
        if not ends:
            return
        try:
            self._end_batch(ends, now)
        except self.store.transient:
            raise
        except Exception:
            log.exception("%d job ends cannot be recorded together; one by one", len(ends))
            for end in ends:
                self._end_alone(end, now)
        self.known.update(m.rel for m in markers)

    def _end_alone(self, end: tuple[str, str, str], now: float) -> None:
        try:
            self._end_batch([end], now)
        except self.store.transient:
            raise
        except Exception as exc:
            job = self.store.job(end[0], end[1])
            if job is not None:
                self.stuck_jobs.add(job.id)
            self.errors(
                "job", f"job {end[1]!r} of printer {end[0]!r} cannot be ended ({end[2]}): "
                f"{type(exc).__name__}: {exc}; left open until restart",
            )  # fmt: skip

    def _end_batch(self, ends: list[tuple[str, str, str]], now: float) -> None:
        def body(states: States, now: float) -> None:
            for printer, name, ended_by in ends:
                job = self.store.job(printer, name)
                if job is not None and job.status == "open":
                    self._finalize(job, ended_by, states, now)

        self._transaction(body, now)

    def _finish_printer_jobs(self, printer: str, states: States, now: float) -> None:
        for job in self.store.open_jobs():
            if job.printer == printer:
                self._finalize(job, "next_job", states, now)

    def _finalize(self, job: JobRow, ended_by: str, states: States, now: float) -> None:
        """Write the job's final verdict and close it (inside a transaction)."""
        obs = self.store.job_obs(job.id)
        state = states.pop(job.id, None) or replay(obs, *self._policy())[0]
        n_all = self.store.n_layers(job.id)
        reason = {
            "ended_by": ended_by, "first_bad_layer": state.first_bad, "layers_scored": len(obs),
            "layers_failed": n_all - len(obs),
            "max_score": max((o.score for o in obs), default=None),
            "layers": [o.layer for o in state.window if o.score >= self.model.threshold],
        }  # fmt: skip
        self._decide(job.id, (job.printer, job.name), state, reason, now)
        self.store.close_job(job.id, ended_by, now)
        self._jobs.pop((job.printer, job.name), None)
        self._closing.append(job.id)
