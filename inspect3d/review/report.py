"""``inspect3d report``: a shop summary and one self-contained HTML page per job.

``OUT/index.html`` lists jobs by printer with verdicts, reject rates, time to detect and open
reviews; ``OUT/jobs/<job>.html`` shows why a job was flagged (score chart, each flagged layer
plain and with its defect map, beside the previous good layer) and links the part's layer record
in ``OUT/jobs/<job>/`` (defect-map stack and projections). Pages open offline from ``file://``.
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
        VERDICT_WORDS=VERDICT_WORDS, detect_note=detect_note,
    )  # fmt: skip
    env.filters["minutes"] = minutes
    return env


def when(t: float | None) -> str:
    """A timestamp as people read it (UTC, to the second)."""
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def minutes(m: float | None) -> str:
    """Minutes to one decimal; below 0.1 in seconds, so a fast catch does not read 0.0."""
    if m is None:
        return "-"
    return f"{m:.1f}" if m >= 0.1 else f"{m * 60:.0f} s"


def describe(job: shop.Job) -> str:
    """The verdict's reason in one plain sentence, naming the likeliest defect class."""
    r = job.caught
    if not r:
        return "No layer reached the threshold." if job.layers else "No layers scored."
    level = "REJECT" if "REJECT" in job.records else "WARN"
    text = f"{VERDICT_WORDS[level]} at layer {r.get('at_layer')}: {r.get('rule')}."
    if r.get("first_bad_layer") is not None:
        text += f" First bad layer {r['first_bad_layer']}."
    name, p = job.named_defect()
    if name:
        text += f" Likeliest defect: {name}" + (f" (p={p:.2f})." if p is not None else ".")
    return text


def detect_note(job: shop.Job) -> str:
    """How the time to detect was measured, for a replayed job (else empty)."""
    if not job.replayed:
        return ""
    if job.time_to_detect()[1] is None and "REJECT" in job.records:
        return (
            "Replayed: the watcher scored this job from a backlog and its files arrived all at "
            "once, so no printing time is known (minutes not shown)."
        )
    return (
        "Replayed: the watcher scored this job from a backlog, so time to detect is measured "
        "between the files' arrival times (mtime), from the first bad layer to the layer that "
        "triggered the REJECT."
    )


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
    replayed: int = 0

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
            replayed=sum(j.replayed for j in jobs),
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


def job_roi(job: shop.Job, meta: dict | None = None) -> list | None:
    """The region of interest of the model that scored ``job`` (a polygon in fractions of the
    layer), from its decisions, else from the watcher's ``meta``; None = the whole layer."""
    rois = [r["roi"] for r in job.records.values() if "roi" in r]  # None there: whole layer
    return rois[0] if rois else (meta or {}).get("roi")


def overlay_title(job: shop.Job, x: shop.Layer) -> list[str]:
    """The overlay's title: the layer (number and file), its score and the likeliest defect."""
    name, p = x.named_class
    cls = f", {name}" + (f" {p:.2f}" if p is not None else "") if name else ""
    return [f"layer {x.layer}: {x.rel.rsplit('/', 1)[-1]}",
            f"score {x.score:.3f} / threshold {job.threshold:.3g}{cls}"]  # fmt: skip


def flagged_view(job: shop.Job, x: shop.Layer, thumb=None, meta: dict | None = None) -> dict:
    """A flagged layer as QA sees it: previous good layer, the layer plain and with its map
    (the model's region of interest outlined; ``meta``: the watcher's, for jobs not decided yet).

    ``thumb(key, make)`` may cache the thumbnails (the review server does); default: none.
    """
    thumb = thumb or (lambda _key, make: make())
    prev = job.previous_good(x)
    have = x.image is not None
    roi = job_roi(job, meta)
    title = overlay_title(job, x)
    return {
        "layer": x, "prev": prev, "defect": x.named_class, "roi": roi,
        "plain_img": thumb(("plain", x.id), lambda: images.thumbnail(x.image) if have else None),
        "img": thumb(("map", x.id), lambda: images.thumbnail(
            x.image, x.defect_map, job.map_scale, title, roi=roi) if have else None),
        "prev_img": thumb(("plain", prev.id), lambda: images.thumbnail(prev.image))
        if prev is not None and prev.image is not None else None,
    }  # fmt: skip


def evidence(job: shop.Job, limit: int, meta: dict | None = None) -> list[dict]:
    """The flagged layers (most suspicious first, up to ``limit``) in layer order."""
    flagged = sorted(job.flagged, key=lambda x: -x.score)[:limit]
    return [flagged_view(job, x, meta=meta) for x in sorted(flagged, key=lambda x: x.layer)]


def write_job(env: Environment, job: shop.Job, out: Path, s: shop.Shop, limit: int) -> Path:
    """The job's page and its layer record."""
    name = page_name(job)
    scored = [x for x in job.layers if x.status == "scored"]
    size = next((images.image_size(x.image) for x in scored if x.image is not None), None)
    roi = job_roi(job, s.meta)
    record = images.write_record(
        out / "jobs" / name, [x.layer for x in scored], [x.defect_map for x in scored],
        job.map_scale, size, roi,
    )  # fmt: skip
    html = env.get_template("job.html").render(
        job=job, chart=chart_of(job), evidence=evidence(job, limit, s.meta), limit=limit, roi=roi,
        record=name if record else None, missing=sum(x.image is None for x in job.flagged),
        failed=[x for x in job.layers if x.status == "failed"],
        ttd=job.time_to_detect(), meta=s.meta, generated=when(time.time()),
    )  # fmt: skip
    return write_text_atomic(out / "jobs" / f"{name}.html", html)


def build_report(
    state: str | Path | None, out: str | Path, max_thumbs: int = 24, db: str | None = None,
    cell: str | None = None,
) -> Path:  # fmt: skip
    """Write the report of the watcher state ``state`` (or of the plant database ``db``, one
    ``cell`` or all) into ``out``; returns ``out/index.html``."""
    src = shop.Source.of(state, db, cell)
    s = shop.read(src)
    out = Path(out).expanduser()
    env = environment()
    pages = {j.id: write_job(env, j, out, s, max_thumbs).name for j in s.jobs}
    html = env.get_template("index.html").render(
        shop=s, source=src.shown, printers=printer_rows(s), pages=pages,
        generated=when(time.time()),
        versions=sorted({(j.model.get("name"), j.model.get("sha256"), j.model.get("config_hash"),
                          j.policy) for j in s.jobs if j.model}, key=str),
        open_reviews=sum(j.open_reviews for j in s.jobs),
    )  # fmt: skip
    index = write_text_atomic(out / "index.html", html)
    log.info("report of %d jobs written to %s", len(s.jobs), index)
    return index
