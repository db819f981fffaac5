"""The reject log (append-only JSON lines) and the QA review folder of flagged layers.

Both are written after the decision is committed to the database, from the decision's stored
record, and flagged done in the database afterwards (an outbox): a crash in between redoes the
step. The log is read back on start, so a record already written is not written twice.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from inspect3d.errors import InspectError
from inspect3d.infer.overlay import write_overlay

log = logging.getLogger(__name__)


class RejectLog:
    """``STATE/rejects.jsonl``: one JSON object per WARN/REJECT and per final verdict."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.written = self._read_ids()

    def _read_ids(self) -> set[int]:
        """Decision ids already in the log; a torn last line (crash mid-write) is cut off."""
        if not self.path.exists():
            return set()
        data = self.path.read_bytes()
        keep = data[: data.rfind(b"\n") + 1]
        if len(keep) != len(data):
            log.warning(
                "cutting a torn last line (%d bytes) off %s", len(data) - len(keep), self.path
            )
            with open(self.path, "r+b") as f:
                f.truncate(len(keep))
        return {json.loads(line)["decision_id"] for line in keep.splitlines() if line.strip()}

    def append(self, record: dict) -> bool:
        """Write ``record`` unless its decision id is there already; True if written now."""
        did = record["decision_id"]
        if did in self.written:
            return False
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            self._write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.written.add(did)
        return True

    @staticmethod
    def _write(fd: int, data: bytes) -> None:
        """The one place bytes reach the disk (ENOSPC and other OSErrors surface here)."""
        if os.write(fd, data) != len(data):
            raise OSError(f"short write of {len(data)} bytes")


def describe(record: dict) -> str:
    """The readable log line for a decision record."""
    r = record.get("reason", {})
    kind = record["verdict"] if record["kind"] != "FINAL" else f"FINAL {record['verdict']}"
    text = (
        f"{kind} printer={record['printer']} job={record['job']} "
        f"first_bad_layer={r.get('first_bad_layer')} layers={r.get('layers')} "
        f"class={r.get('class')} rule={r.get('rule')!r}"
    )
    if record["kind"] == "FINAL":
        text += (
            f" ended_by={r.get('ended_by')} scored={r.get('layers_scored')}"
            f" failed={r.get('layers_failed')}"
        )
    return text


def save_evidence(review: Path, record: dict, layers: list[tuple[Path, object]]) -> list[str]:
    """Link (or copy) each flagged layer image and write its overlay into the review folder.

    ``layers``: (image path, defect map) pairs. Returns the problems met (missing files...).
    """
    folder = review / _safe(record["printer"]) / _safe(record["job"])
    folder.mkdir(parents=True, exist_ok=True)
    problems = []
    map_threshold = record.get("map_threshold", record["threshold"])
    roi = record.get("roi")  # the model's region of interest, outlined; None = whole layer
    for image, defect_map in layers:
        title = [
            f"{record['printer']} / {record['job']} / {image.name}",
            f"{record['verdict']} evidence, map peak {float(defect_map.max()):.3g}",
        ]
        try:
            _link_or_copy(image, folder / image.name)
            write_overlay(image, defect_map, folder, map_threshold, title, roi=roi)
        except (OSError, ValueError, InspectError) as exc:
            problems.append(f"evidence for {str(image)!r}: {exc}")
    return problems


def _link_or_copy(src: Path, dest: Path) -> None:
    if dest.exists():
        return
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_. " else "_" for c in name).strip(". ") or "_"
