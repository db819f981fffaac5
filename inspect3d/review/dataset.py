"""``inspect3d dataset from-reviews``: reviewed layers as a manifest ``inspect3d train`` reads.

Confirmed defects are labelled with their defect class, false alarms with the normal class, so
the next model learns from the shop's own layers. The class of a confirmed defect is the
reviewer's reason code when it is a class of the model (``streak``...), else the model's own
defect class for that layer. 'Unsure' layers are left out (and counted).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from inspect3d.data.manifest import MANIFEST_COLUMNS
from inspect3d.errors import InspectError
from inspect3d.infer.model import likeliest_defect
from inspect3d.io import write_text_atomic
from inspect3d.review import shop
from inspect3d.review.report import when

EXTRA_COLUMNS = ("decision", "reason", "reviewer", "reviewed_at", "note", "score")


@dataclass(frozen=True)
class ExportSummary:
    path: Path
    rows: int
    unsure: int  # reviewed 'unsure': left out
    missing: int  # image file gone: left out
    labels: dict[str, int]

    def __str__(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.labels.items()))
        return (
            f"wrote {self.rows} reviewed layers to {self.path} ({counts or 'none'}); left out "
            f"{self.unsure} marked unsure and {self.missing} whose image file is gone"
        )


def label_of(layer: shop.Layer, normal: str) -> str | None:
    """The training label of a reviewed layer; None for 'unsure'."""
    decision = layer.review["decision"]
    if decision == "false_alarm":
        return normal
    if decision != "confirmed_defect":
        return None
    if layer.review["reason"] in layer.probs and layer.review["reason"] != normal:
        return layer.review["reason"]
    return likeliest_defect(layer.probs, normal)[0] or layer.review["reason"]


def _path_text(path: Path, base: Path) -> str:
    """Relative to the CSV's folder when below it (the manifest convention), else absolute."""
    path = path.resolve()
    try:
        return path.relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(path)


def export_reviews(
    state: str | Path | None, out: str | Path, normal_class: str | None = None,
    db: str | None = None, cell: str | None = None,
) -> ExportSummary:  # fmt: skip
    """Write the reviewed layers of ``state`` (or of the plant database ``db``, one ``cell`` or
    all) as a manifest CSV at ``out``."""
    src = shop.Source.of(state, db, cell)
    s = shop.read(src)
    normal = normal_class or s.normal_class()
    if normal is None:
        raise InspectError("no scored layers to tell the normal class from: give normal_class=NAME")
    out = Path(out).expanduser()
    rows, unsure, missing, labels = [], 0, 0, {}
    for job in s.jobs:
        for x in job.layers:
            if x.review is None:
                continue
            label = label_of(x, normal)
            if label is None:
                unsure += 1
            elif x.image is None:
                missing += 1
            else:
                rows.append(_row(x, job, label, out.parent))
                labels[label] = labels.get(label, 0) + 1
    if not rows:
        raise InspectError(
            f"no reviewed layers to export from {src.shown!r} ({unsure} unsure, {missing} "
            "with their image gone): review some first with `inspect3d review`"
        )
    _write(out, rows)
    return ExportSummary(out, len(rows), unsure, missing, labels)


def _row(x: shop.Layer, job: shop.Job, label: str, base: Path) -> dict:
    r = x.review
    return {
        "path": _path_text(x.image, base), "label": label, "job": job.name, "layer": x.layer,
        "printer": job.printer, "mask": "", "decision": r["decision"], "reason": r["reason"],
        "reviewer": r["reviewer"], "reviewed_at": when(r["at"]), "note": r["note"],
        "score": f"{x.score:.6f}",
    }  # fmt: skip


def _write(out: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(
        buf, fieldnames=[*MANIFEST_COLUMNS, *EXTRA_COLUMNS], lineterminator="\n"
    )
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out, buf.getvalue())
