"""Polling the inbox ``<inbox>/<printer>/<job>/<file>``: new files, once they stop changing.

Polling (not file-system events) so that it works the same on network shares, where events are
unreliable. A file is *stable* when its size and mtime have not changed for ``settle_s`` seconds
(a file whose mtime is already that old counts as stable when first seen). Hidden files
(``.name``, the temporary names printers and ``inspect3d simulate`` write to) are ignored.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from inspect3d.data.layout import InboxName, natural_key, parse_inbox_path

log = logging.getLogger(__name__)
_ODD = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Arrival:
    """A stable file below the inbox (not yet checked for being an image)."""

    path: Path
    rel: str
    printer: str
    job: str
    layer: int | None
    size: int
    mtime: float
    marker: bool = False


class InboxScanner:
    """Walks the inbox on each ``poll`` and returns the files that became stable since."""

    def __init__(self, inbox: Path, pattern: re.Pattern[str], marker: str, settle_s: float) -> None:
        self.inbox, self.pattern, self.marker, self.settle_s = (
            Path(inbox),
            pattern,
            marker,
            settle_s,
        )
        self._seen: dict[str, tuple[int, float, float]] = {}  # rel -> size, mtime, first seen
        self._names: dict[str, InboxName | None] = {}  # rel -> parsed name (parse once)
        self._ready: dict[str, Arrival] = {}  # stable, not yet recorded
        self.last_error: str | None = None
        self.waiting: set[tuple[str, str]] = set()  # (printer, job) with files still settling

    def poll(
        self, known: set[str], now: float | None = None, skip_dirs: frozenset[str] = frozenset()
    ) -> list[Arrival]:
        """Stable files not in ``known`` (relative paths already recorded), in a fixed order.

        ``skip_dirs``: 'printer/job' folders not to list (ended jobs: keeps a poll cheap when
        the inbox holds weeks of layers).
        """
        now = time.time() if now is None else now
        self.waiting = set()
        # stable files still queued are not looked at again (their size is checked on reading)
        self._ready = {k: a for k, a in self._ready.items() if k not in known}
        walked = self._walk(known, skip_dirs)
        for rel, path, st in walked:
            arrival = self._arrival(rel, path, st)
            if arrival is None:
                continue
            if self._is_stable(rel, st.st_size, st.st_mtime, now):
                self._ready[rel] = arrival
            else:
                self.waiting.add((arrival.printer, arrival.job))
        stable = list(self._ready.values())
        current = {rel for rel, _, _ in walked}
        self._seen = {k: v for k, v in self._seen.items() if k in current}  # bounded memory
        self._names = {k: v for k, v in self._names.items() if k in current}
        first: dict[tuple[str, str], float] = {}
        for a in stable:  # a printer's older job first, even when both arrive in one poll
            key = (a.printer, a.job)
            first[key] = min(first.get(key, a.mtime), a.mtime)
        return sorted(stable, key=lambda a: _order(a, first[(a.printer, a.job)]))

    def forget(self, rel: str) -> None:
        """Look at ``rel`` afresh (it changed after it looked stable)."""
        self._seen.pop(rel, None)
        self._ready.pop(rel, None)

    def _is_stable(self, rel: str, size: int, mtime: float, now: float) -> bool:
        prev = self._seen.get(rel)
        if prev is None or prev[:2] != (size, mtime):
            self._seen[rel] = (size, mtime, now)
            return now - mtime >= self.settle_s and now >= mtime
        return now - prev[2] >= self.settle_s

    def _arrival(self, rel: str, path: Path, st: os.stat_result) -> Arrival | None:
        if rel not in self._names:
            self._names[rel] = parse_inbox_path(rel, self.pattern)
        name = self._names[rel]
        if name is None:
            return None
        marker = path.name == self.marker
        layer = None if marker else name.layer
        return Arrival(path, rel, name.printer, name.job, layer, st.st_size, st.st_mtime, marker)

    def _walk(
        self, known: set[str], skip: frozenset[str]
    ) -> list[tuple[str, Path, os.stat_result]]:
        """(relative path, path, stat) of new non-hidden files 3 levels down; errors noted."""
        out: list[tuple[str, Path, os.stat_result] | None] = []
        self.last_error = None
        try:
            for printer in _entries(self.inbox, dirs=True):
                for job in _entries(printer, dirs=True):
                    folder = f"{printer.name}/{job.name}"
                    if folder in skip:
                        continue
                    for f in _entries(job, dirs=False):
                        rel = f"{folder}/{f.name}"
                        if rel not in known and rel not in self._ready:
                            out.append(self._item(f, rel))
        except OSError as exc:  # the inbox itself vanished or cannot be listed
            self.last_error = f"cannot list inbox {str(self.inbox)!r}: {exc.strerror or exc}"
        return [x for x in out if x is not None]

    @staticmethod
    def _item(entry: os.DirEntry, rel: str) -> tuple[str, Path, os.stat_result] | None:
        try:
            st = entry.stat()  # the target: its size is what gets read
        except OSError:
            return None  # vanished between listing and stat: seen again if it comes back
        return rel, Path(entry.path), st


def _entries(folder: Path | os.DirEntry, dirs: bool) -> list[os.DirEntry]:
    """Non-hidden children of ``folder`` that are directories (``dirs``) or files/links."""
    try:
        with os.scandir(folder) as it:
            items = list(it)
    except (FileNotFoundError, NotADirectoryError):
        if isinstance(folder, Path):
            raise  # the inbox itself: reported by the caller
        return []  # a printer or job folder deleted mid-scan
    except PermissionError as exc:
        log.warning("cannot list %s: %s", getattr(folder, "path", folder), exc)
        return []
    keep = [e for e in items if not e.name.startswith(".")]
    if dirs:
        return [e for e in keep if e.is_dir(follow_symlinks=False)]
    return [e for e in keep if not e.is_dir(follow_symlinks=True)]


def _order(a: Arrival, job_first: float) -> tuple:
    layer = -1 if a.layer is None else a.layer
    return (a.marker, a.printer, job_first, a.job, layer, a.mtime, natural_key(a.rel))


def odd_name(rel: str) -> str | None:
    """Why a relative path is not acceptable as a layer name (control characters), or None."""
    if _ODD.search(rel):
        return f"file name {rel!r} contains control characters; rename it without them"
    return None


def inside(path: Path, root: Path) -> bool:
    """True when ``path`` (following symlinks) lies inside ``root``."""
    try:
        return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))
    except OSError:
        return False
