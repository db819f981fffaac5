"""``inspect3d report``: a shop summary and one self-contained HTML page per job.

``OUT/index.html`` lists jobs by printer with verdicts, reject rates, time to detect and open
reviews; ``OUT/jobs/<job>.html`` shows why a job was flagged (score chart, the flagged layers
with their defect maps beside the previous good layer) and links the part's layer record in
``OUT/jobs/<job>/`` (defect-map stack and projections). Pages open offline from ``file://``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape

from inspect3d.io import write_text_atomic
from inspect3d.review import images, shop
from inspect3d.review.chart import score_chart
from inspect3d.review.decisions import DECISIONS, REASON_TEXT

log = logging.getLogger(__name__)
TEMPLATES = Path(__file__).resolve().parent / "templates"
VERDICT_WORDS = {"REJECT": "Rejected", "WARN": "Warning", "OK": "Passed"}


def environment() -> Environment:
    """Jinja with autoescaping on for every template: names and notes come from outside."""
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.update(
        describe=describe, when=when, DECISIONS=DECISIONS, REASON_TEXT=REASON_TEXT,
        VERDICT_WORDS=VERDICT_WORDS,
    )  # fmt: skip
    env.filters["minutes"] = lambda m: "-" if m is None else f"{m:.1f}"
    return env


def when(t: float | None) -> str:
    """A timestamp as people read it (UTC, to the second)."""
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe(job: shop.Job) -> str:
    """The verdict's reason in one plain sentence."""
    r = job.caught
    if not r:
        return "No layer reached the threshold." if job.layers else "No layers scored."
    level = "REJECT" if "REJECT" in job.records else "WARN"
    text = f"{VERDICT_WORDS[level]} at layer {r.get('at_layer')}: {r.get('rule')}."
    if r.get("first_bad_layer") is not None:
        text += f" First bad layer {r['first_bad_layer']}"
        text += f", class {r['class']}." if r.get("class") else "."
    return text


def page_name(job: shop.Job) -> str:
    """A file name for the job that is safe everywhere and unique (the job id leads)."""
    return f"{job.id:04d}-{_slug(job.printer)}-{_slug(job.name)}"


def _slug(name: str, limit: int = 40) -> str:
    return "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in name)[:limit]


@dataclass
class PrinterRow:
    name: str
    jobs: int
    rejected: int
    warned: int
    ttd_layers: float | None
    ttd_minutes: float | None
    open_reviews: int

    @property
    def reject_rate(self) -> float:
        return self.rejected / self.jobs if self.jobs else 0.0


def printer_rows(s: shop.Shop) -> list[PrinterRow]:
    """Per printer: how many jobs were rejected and how fast defects were caught."""
    rows = []
    for name, jobs in s.printers().items():
        ttd = [j.time_to_detect() for j in jobs]
        layers = [t[0] for t in ttd if t[0] is not None]
        minutes = [t[1] for t in ttd if t[1] is not None]
        rows.append(PrinterRow(
            name=name, jobs=len(jobs), rejected=sum(j.verdict == "REJECT" for j in jobs),
            warned=sum(j.verdict == "WARN" for j in jobs),
            ttd_layers=sum(layers) / len(layers) if layers else None,
            ttd_minutes=sum(minutes) / len(minutes) if minutes else None,
            open_reviews=sum(j.open_reviews for j in jobs),
        ))  # fmt: skip
    return rows


def chart_of(job: shop.Job):
    points = [(x.layer, x.score) for x in job.layers if x.status == "scored"]
    marks = {
        "first bad layer": job.caught.get("first_bad_layer"),
        "WARN": job.records.get("WARN", {}).get("reason", {}).get("at_layer"),
        "REJECT": job.records.get("REJECT", {}).get("reason", {}).get("at_layer"),
    }
    return score_chart(points, job.threshold, marks)


def evidence(job: shop.Job, limit: int) -> list[dict]:
    """The flagged layers (most suspicious first, up to ``limit``) with their thumbnails."""
    flagged = sorted(job.flagged, key=lambda x: -x.score)[:limit]
    out = []
    for x in sorted(flagged, key=lambda x: x.layer):
        prev = job.previous_good(x)
        out.append({
            "layer": x, "prev": prev,
            "img": images.thumbnail(x.image, x.defect_map) if x.image else None,
            "prev_img": images.thumbnail(prev.image, None) if prev and prev.image else None,
        })  # fmt: skip
    return out


def write_job(env: Environment, job: shop.Job, out: Path, s: shop.Shop, limit: int) -> Path:
    """The job's page and its layer record."""
    name = page_name(job)
    scored = [x for x in job.layers if x.status == "scored"]
    record = images.write_record(
        out / "jobs" / name, [x.layer for x in scored], [x.defect_map for x in scored]
    )
    html = env.get_template("job.html").render(
        job=job, chart=chart_of(job), evidence=evidence(job, limit), limit=limit,
        record=name if record else None, missing=sum(x.image is None for x in job.flagged),
        failed=[x for x in job.layers if x.status == "failed"],
        ttd=job.time_to_detect(), meta=s.meta, generated=when(time.time()),
    )  # fmt: skip
    return write_text_atomic(out / "jobs" / f"{name}.html", html)


def build_report(state: str | Path, out: str | Path, max_thumbs: int = 24) -> Path:
    """Write the report of the watcher state ``state`` into ``out``; returns ``out/index.html``."""
    store = shop.open_store(state)
    try:
        s = shop.load(store)
    finally:
        store.close()
    out = Path(out).expanduser()
    env = environment()
    pages = {j.id: write_job(env, j, out, s, max_thumbs).name for j in s.jobs}
    html = env.get_template("index.html").render(
        shop=s, printers=printer_rows(s), pages=pages, generated=when(time.time()),
        versions=sorted({(j.model.get("name"), j.model.get("sha256"), j.model.get("config_hash"),
                          j.policy) for j in s.jobs if j.model}, key=str),
        open_reviews=sum(j.open_reviews for j in s.jobs),
    )  # fmt: skip
    index = write_text_atomic(out / "index.html", html)
    log.info("report of %d jobs written to %s", len(s.jobs), index)
    return index
