"""The watcher's store read for QA: jobs with their verdicts, layers, flags and reviews.

One read of the store (``STATE/watch.db``, or a plant database: see ``Source``) gives plain
objects that the report, the review page and the label export share, so all three agree on
what counts as flagged, open or caught.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from inspect3d.data.layout import legacy_folder_name, text_name
from inspect3d.infer.model import likeliest_defect
from inspect3d.review.decisions import is_open
from inspect3d.watch import db as watch_db
from inspect3d.watch.db import shown_url
from inspect3d.watch.journal import evidence_folder
from inspect3d.watch.store import DecisionRow, JobRow, LayerRow, Store, decode_map

# A job counts as replayed (scored from a backlog, not live) when the watcher scored its
# layers this long after they arrived, or scored most of them together in one batch.
BACKLOG_S = 60.0


@dataclass
class Layer:
    """One layer of a job as the watcher recorded it, with where its image is now."""

    id: int
    layer: int
    rel: str
    status: str
    score: float | None
    label: str | None
    probs: dict[str, float]
    defect_map: np.ndarray | None
    at: float | None  # when the layer arrived (file mtime), else when it was scored
    error: str | None
    image: Path | None  # None: the file has been moved or deleted since
    review: dict | None = None
    flagged: bool = False
    scored_at: float | None = None  # when the watcher recorded it
    defect_class: str = ""  # the likeliest defect class (arg-max over all but the normal one)
    defect_p: float | None = None

    @property
    def named_class(self) -> tuple[str, float | None]:
        """(class, p) to show: the likeliest defect class when known, else the model's label."""
        if self.defect_class:
            return self.defect_class, self.defect_p
        return self.label or "", self.probs.get(self.label or "")


@dataclass
class Job:
    """A print job: verdict, reason, the decisions on the way and its layers in layer order."""

    id: int
    printer: str
    name: str
    status: str
    verdict: str
    final: bool
    ended_by: str | None
    records: dict[str, dict]  # decision kind (WARN, REJECT, FINAL) -> record
    decided_at: dict[str, float]
    threshold: float
    layers: list[Layer] = field(default_factory=list)
    map_threshold: float | None = None  # None: the defect map crosses at ``threshold``
    cell: str = ""  # the watcher's cell ('' in an SQLite state folder)

    @property
    def map_scale(self) -> float:
        """The defect map's value at the threshold (the colour scale's middle)."""
        return self.map_threshold if self.map_threshold is not None else self.threshold

    @property
    def caught(self) -> dict:
        """The reason of the escalation that flagged the job (REJECT, else WARN), or {}."""
        return (self.records.get("REJECT") or self.records.get("WARN") or {}).get("reason", {})

    @property
    def flagged(self) -> list[Layer]:
        return [x for x in self.layers if x.flagged]

    @property
    def open_reviews(self) -> int:
        return sum(is_open(x.review) for x in self.flagged)

    @property
    def model(self) -> dict:
        return next((r.get("model") for r in self.records.values() if r.get("model")), {})

    @property
    def policy(self) -> str | None:
        return next((r.get("policy") for r in self.records.values() if r.get("policy")), None)

    @property
    def replayed(self) -> bool:
        """Scored from a backlog (a replay, or a watcher catching up), not as layers arrived."""
        scored = [x for x in self.layers if x.status == "scored" and x.scored_at is not None]
        if len(scored) < 2:
            return False
        lags = sorted(x.scored_at - x.at for x in scored if x.at is not None)
        batches = {x.scored_at for x in scored}
        return bool(lags and lags[len(lags) // 2] > BACKLOG_S) or len(batches) <= len(scored) / 2

    @property
    def arrival_span_s(self) -> float:
        """Seconds between the first and the last layer's arrival (file mtimes)."""
        times = [x.at for x in self.layers if x.at is not None]
        return max(times) - min(times) if times else 0.0

    def time_to_detect(self) -> tuple[int | None, float | None]:
        """Layers and minutes from the first bad layer's arrival to the REJECT.

        Live, the REJECT is the decision's time. Replayed, that time says when the replay ran,
        so the REJECT is the arrival (mtime) of the layer that triggered it: the printing time
        the defect went on. Files copied all at once carry no printing time: minutes are None.
        """
        reject = self.records.get("REJECT")
        if reject is None:
            return None, None
        first, at = reject["reason"].get("first_bad_layer"), reject["reason"].get("at_layer")
        if first is None or at is None:
            return None, None
        onset = self._arrival(first)
        if not self.replayed:
            end = self.decided_at["REJECT"]
        elif self.arrival_span_s >= len(self.layers) * 0.5:  # the files carry printing times
            end = self._arrival(at)
        else:
            end = None
        minutes = None if onset is None or end is None else max(0.0, end - onset) / 60
        return at - first, minutes

    def _arrival(self, layer: int) -> float | None:
        return next((x.at for x in self.layers if x.layer == layer), None)

    def named_defect(self) -> tuple[str, float | None]:
        """The class the verdict names: the likeliest defect of its highest-scoring layer."""
        r = self.caught
        layers = set(r.get("layers") or [])
        hits = [x for x in self.flagged if x.layer in layers] or self.flagged
        if hits:
            name, p = max(hits, key=lambda x: x.score).named_class
            if name:
                return name, p
        return r.get("class") or "", r.get("class_p")

    def previous_good(self, layer: Layer) -> Layer | None:
        """The last scored layer below the threshold before ``layer``: what 'normal' looked like."""
        good = [
            x for x in self.layers
            if x.layer < layer.layer and x.status == "scored" and x.score < self.threshold
        ]  # fmt: skip
        return good[-1] if good else None


@dataclass
class Shop:
    """All jobs of one watcher's state folder."""

    state: Path
    meta: dict
    jobs: list[Job]

    def job(self, job_id: int) -> Job | None:
        return next((j for j in self.jobs if j.id == job_id), None)

    def printers(self) -> dict[str, list[Job]]:
        out: dict[str, list[Job]] = {}
        for j in self.jobs:  # a plant's printers are named by cell too: two cells may share one
            out.setdefault(f"{j.cell}/{j.printer}" if j.cell else j.printer, []).append(j)
        return dict(sorted(out.items()))

    def normal_class(self) -> str | None:
        """The model's normal class, read off any scored layer: score = 1 - P(normal)."""
        for j in self.jobs:
            for x in j.layers:
                if x.score is not None and x.probs:
                    c, _ = min(x.probs.items(), key=lambda kv: abs(kv[1] - (1 - x.score)))
                    return c
        return None


@dataclass(frozen=True)
class Source:
    """Where QA reads from: a watcher's state folder (SQLite), or a plant database (``db``),
    one cell of it or all (``cell`` None); files (evidence) stay in each cell's state folder."""

    state: Path | None = None
    db: str | None = None
    cell: str | None = None

    @classmethod
    def of(cls, state: str | Path | Source | None, db: str | None = None,
           cell: str | None = None) -> Source:  # fmt: skip
        if isinstance(state, Source):
            return state
        return cls(None if state is None else Path(state).expanduser(), db, cell or None)

    @property
    def shown(self) -> str:
        """The source as people read it (a database URL without its password)."""
        if self.db is None:
            return str(self.state)
        return shown_url(self.db) + (f" cell {self.cell}" if self.cell else " (all cells)")


def open_store(state: str | Path | Source | None, db: str | None = None,
               cell: str | None = None) -> Store:  # fmt: skip
    """The store QA reads (it must exist: we never create an empty one)."""
    src = Source.of(state, db, cell)
    return watch_db.open_store(src.state, src.db, src.cell)


def load(store: Store) -> Shop:
    """Every job (of the cell, or of the plant) with its layers, decisions and current reviews."""
    cells = {c: {k: json.loads(v) for k, v in m.items()} for c, m in store.cell_meta().items()}
    meta = {k: json.loads(v) for k, v in store.meta().items()}
    reviews = store.current_reviews()
    jobs = []
    for row in store.jobs():
        cell_meta = cells.get(row.cell, meta)
        job = _job(row, store.job_decisions(row.id), cell_meta)
        state, inbox = _folders(store, cell_meta)
        job.layers = [
            _layer(r, job, state, inbox, reviews.get(r.id)) for r in store.job_layers(job.id)
        ]
        jobs.append(job)
    s = Shop(store.state or Path(meta.get("state") or "."), meta, jobs)
    normal = s.normal_class()
    for x in (x for j in jobs for x in j.layers if x.probs and normal is not None):
        x.defect_class, x.defect_p = likeliest_defect(x.probs, normal)
    return s


def read(src: Source) -> Shop:
    """``load`` of the store ``src`` names, opened for the reading and closed again."""
    store = open_store(src)
    try:
        return load(store)
    finally:
        store.close()


def _folders(store: Store, meta: dict) -> tuple[Path, Path | None]:
    """A cell's state folder (the one given, when reading one cell) and its inbox."""
    state = store.state
    if state is None or store.cell is None:
        state = Path(meta.get("state") or state or ".")
    return state, Path(meta["inbox"]) if meta.get("inbox") else None


def _job(row: JobRow, decisions: list[DecisionRow], meta: dict) -> Job:
    records = {d.kind: d.record for d in decisions}
    final = records.get("FINAL")
    threshold = next((r["threshold"] for r in records.values() if "threshold" in r), None)
    map_threshold = next(
        (r["map_threshold"] for r in records.values() if "map_threshold" in r),
        meta.get("map_threshold"),
    )
    return Job(
        id=row.id, printer=row.printer, name=row.name, status=row.status,
        verdict=final["verdict"] if final else row.level, final=final is not None,
        ended_by=row.end_reason, records=records,
        decided_at={d.kind: d.created_at for d in decisions},
        threshold=float(threshold if threshold is not None else meta.get("threshold", 0.5)),
        map_threshold=None if map_threshold is None else float(map_threshold), cell=row.cell,
    )  # fmt: skip


def _layer(row: LayerRow, job: Job, state: Path, inbox: Path | None, review) -> Layer:
    scored = row.status == "scored"
    return Layer(
        id=row.id, layer=row.layer, rel=row.rel, status=row.status,
        score=row.score, label=row.label, probs=json.loads(row.probs) if row.probs else {},
        defect_map=decode_map(row) if scored and row.map is not None else None,
        at=row.mtime or row.done_at, scored_at=row.done_at, error=row.error,
        image=find_image(state, inbox, job, row.rel, row.sha256), review=review,
        flagged=scored and row.score >= job.threshold,
    )  # fmt: skip


def find_image(
    state: Path, inbox: Path | None, job: Job, rel: str, sha256: str | None = None
) -> Path | None:
    """The layer image in the inbox, else the watcher's evidence copy, else None (gone)."""
    raw = text_name(rel)
    name = raw.rsplit("/", 1)[-1]
    candidates = [inbox / raw] if inbox is not None else []
    candidates.append(evidence_folder(state / "review", job.printer, job.name) / name)
    found = next((p for p in candidates if p.is_file()), None)
    if found is not None or sha256 is None:
        return found
    # evidence written before folder names were collision-free: two jobs could share a
    # folder, so a copy there counts only if it is this layer's file (same SHA-256)
    old = state / "review" / legacy_folder_name(job.printer) / legacy_folder_name(job.name)
    return old / name if _has_sha256(old / name, sha256) else None


def _has_sha256(path: Path, sha256: str) -> bool:
    if not path.is_file():
        return False
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest() == sha256
