"""The reject log (append-only JSON lines) and the QA review folder of flagged layers.

Both are written after the decision is committed to the database, from the decision's stored
record, and flagged done in the database afterwards (an outbox): a crash in between redoes the
step. The log is read back on start, so a record already written is not written twice.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

from inspect3d.data.layout import folder_name
from inspect3d.errors import InspectError
from inspect3d.infer.overlay import write_overlay

log = logging.getLogger(__name__)


class RejectLog:
    """``STATE/rejects.jsonl``: one JSON object per WARN/REJECT and per final verdict.

    A record reaches the file whole or not at all: it is written in one piece and synced, and
    after a failed or short write (disk full) the file is cut back to its length before. On
    start, every line that is not a whole record (a crash mid-write, an old partial record) is
    moved to ``rejects.broken.jsonl``, counted in ``broken`` and logged.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.broken = 0
        self.written = self._read_ids()

    @property
    def broken_path(self) -> Path:
        return self.path.with_name(self.path.stem + ".broken" + self.path.suffix)

    def _read_ids(self) -> set[int]:
        """Decision ids already in the log; broken records set aside (see the class doc)."""
        if not self.path.exists():
            return set()
        data = self.path.read_bytes()
        good, bad, ids = [], [], set()
        for line in data.splitlines(keepends=True):
            did = _decision_id(line)
            if did is None:
                bad.append(line if line.endswith(b"\n") else line + b"\n")
            elif did not in ids:
                ids.add(did)
                good.append(line)
        if bad:
            try:
                self._set_aside(b"".join(good), bad)
            except OSError as exc:  # e.g. still no space: at least no torn tail to append to
                log.error("cannot set broken records of %s aside: %s", self.path, exc)
                with open(self.path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        return ids

    def _set_aside(self, good: bytes, bad: list[bytes]) -> None:
        """Append the broken lines to the side file, then replace the log by its good lines."""
        self.broken = len([b for b in bad if b.strip()])
        with open(self.broken_path, "ab") as f:
            f.write(b"".join(bad))
            f.flush()
            os.fsync(f.fileno())
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "wb") as f:
            f.write(good)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        log.warning("%s: %d broken record(s) moved to %s", self.path, self.broken, self.broken_path)

    def append(self, records: list[dict]) -> list[dict]:
        """Write the records whose decision ids are not there yet, in one write and one sync
        (all of them or, after a failed write, none: the file is cut back); returns them."""
        new, ids = [], set()
        for record in records:
            did = record["decision_id"]
            if did not in self.written and did not in ids:
                new.append(record)
                ids.add(did)
        if not new:
            return []
        data = b"".join((json.dumps(r, sort_keys=True) + "\n").encode() for r in new)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            before = os.fstat(fd).st_size
            try:
                self._write(fd, data)
                os.fsync(fd)
            except OSError:
                _cut_back(fd, before)
                raise
        finally:
            os.close(fd)
        self.written |= ids
        return new

    @staticmethod
    def _write(fd: int, data: bytes) -> None:
        """The one place bytes reach the disk (ENOSPC and other OSErrors surface here)."""
        n = os.write(fd, data)
        if n != len(data):
            raise OSError(errno.ENOSPC, f"short write: {n} of {len(data)} bytes")


def _cut_back(fd: int, length: int) -> None:
    """Undo a failed append (no partial record stays behind); logged if even that fails."""
    try:
        os.ftruncate(fd, length)
        os.fsync(fd)
    except OSError as exc:  # the start-up repair sets the partial record aside
        log.error("cannot cut the reject log back to %d bytes: %s", length, exc)


def _decision_id(line: bytes) -> int | None:
    """The decision id of a whole record line, or None for a broken one."""
    if not line.endswith(b"\n"):
        return None
    try:
        did = json.loads(line)["decision_id"]
    except (ValueError, TypeError, KeyError):
        return None
    return did if isinstance(did, int) else None


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
    folder = evidence_folder(review, record["printer"], record["job"])
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


def evidence_folder(review: Path, printer: str, job: str) -> Path:
    """``review/<printer>/<job>`` with both names as collision-free folder names."""
    return review / folder_name(printer) / folder_name(job)
