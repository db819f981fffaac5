"""Polling the inbox ``<inbox>/<printer>/<job>/<file>``: new files, once they stop changing.

Polling (not file-system events) so that it works the same on network shares, where events are
unreliable. A file is *stable* when its size and mtime have not changed for ``settle_s`` seconds
(a file whose mtime is already that old counts as stable when first seen). Hidden files
(``.name``, the temporary names printers and ``inspect3d simulate`` write to) are ignored.

Names are kept as text losslessly (``layout.name_text``): a name that is not UTF-8 is escaped,
and an arrival whose name cannot be a layer (not UTF-8, control characters, a layer number
SQLite cannot hold) carries the reason in ``problem``. A folder with an image's name in a job
folder is an arrival too (it is recorded as failed, not silently skipped). A file handed back
as possibly incomplete (``defer``) is looked at again once its size or mtime changes; one that
stays unchanged for ``incomplete_s`` comes back with the reason in ``problem``.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

from inspect3d.data.layout import (
    IMAGE_EXTENSIONS,
    MAX_LAYER,
    InboxName,
    is_utf8,
    name_text,
    natural_key,
    parse_inbox_path,
    text_name,
)

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
    problem: str | None = None  # why it cannot be a layer as it is (recorded as failed)
    tries: int = 0  # earlier looks at it that found it incomplete


@dataclass(frozen=True)
class Deferred:
    """A file that looked incomplete: how it looked then, since when, and why."""

    arrival: Arrival
    since: float
    tries: int
    reason: str


class InboxScanner:
    """Walks the inbox on each ``poll`` and returns the files that became stable since."""

    def __init__(
        self,
        inbox: Path,
        pattern: re.Pattern[str],
        marker: str,
        settle_s: float,
        incomplete_s: float = 30.0,
    ) -> None:
        self.inbox, self.pattern, self.marker = Path(inbox), pattern, marker
        self.settle_s, self.incomplete_s = settle_s, incomplete_s
        self._deferred: dict[str, Deferred] = {}  # rel -> looked incomplete, waiting for change
        self._tries: dict[str, int] = {}  # rel -> incomplete looks so far
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
        self._end_deferred(skip_dirs)
        walked = self._walk(known, skip_dirs)
        for rel, path, st in walked:
            arrival = self._arrival(rel, path, st)
            if arrival is None:
                continue
            job = (arrival.printer, arrival.job)
            arrival = self._after_deferral(arrival, now)
            if arrival is None:
                self.waiting.add(job)
            elif self._is_stable(rel, st.st_size, st.st_mtime, now) or arrival.problem:
                self._ready[rel] = arrival
            else:
                self.waiting.add((arrival.printer, arrival.job))
        stable = list(self._ready.values())
        current = {rel for rel, _, _ in walked}
        self._seen = {k: v for k, v in self._seen.items() if k in current}  # bounded memory
        self._names = {k: v for k, v in self._names.items() if k in current}
        self._deferred = {k: v for k, v in self._deferred.items() if k in current}
        self._tries = {k: v for k, v in self._tries.items() if k in current}
        first: dict[tuple[str, str], float] = {}
        for a in stable:  # a printer's older job first, even when both arrive in one poll
            key = (a.printer, a.job)
            first[key] = min(first.get(key, a.mtime), a.mtime)
        return sorted(stable, key=lambda a: _order(a, first[(a.printer, a.job)]))

    def forget(self, rel: str) -> None:
        """Look at ``rel`` afresh (it changed after it looked stable)."""
        self._seen.pop(rel, None)
        self._ready.pop(rel, None)

    def defer(self, a: Arrival, reason: str, now: float | None = None) -> None:
        """``a`` looked incomplete: look again once it changes, or give up after
        ``incomplete_s`` without a change (then it comes back with ``problem`` set)."""
        now = time.time() if now is None else now
        self.forget(a.rel)
        self._tries[a.rel] = a.tries + 1
        self._deferred[a.rel] = Deferred(a, now, a.tries + 1, reason)

    def _end_deferred(self, ended: frozenset[str]) -> None:
        """Deferred files of jobs that ended meanwhile come back now, failed with the reason
        (their folder is not listed any more)."""
        for rel, d in list(self._deferred.items()):
            if rel.rsplit("/", 1)[0] in ended:
                del self._deferred[rel]
                why = f"{d.reason} (its job ended before it was complete)"
                self._ready[rel] = replace(d.arrival, tries=d.tries, problem=why)

    def _after_deferral(self, a: Arrival, now: float) -> Arrival | None:
        """The arrival to go on with (a deferred file that changed, or gave up), or None while
        a deferred file waits for a change."""
        d = self._deferred.get(a.rel)
        tries = self._tries.get(a.rel, 0)
        if d is None:
            return replace(a, tries=tries) if tries else a
        if (a.size, a.mtime) != (d.arrival.size, d.arrival.mtime):
            del self._deferred[a.rel]  # it changed: settle and try again
            return replace(a, tries=tries)
        if now - d.since < self.incomplete_s:
            return None
        del self._deferred[a.rel]
        why = f"{d.reason} (unchanged for {self.incomplete_s:g} s after {d.tries} tries)"
        return replace(a, tries=tries, problem=a.problem or why)

    def _is_stable(self, rel: str, size: int, mtime: float, now: float) -> bool:
        prev = self._seen.get(rel)
        if prev is None or prev[:2] != (size, mtime):
            self._seen[rel] = (size, mtime, now)
            return now - mtime >= self.settle_s and now >= mtime
        return now - prev[2] >= self.settle_s

    def _arrival(self, rel: str, path: Path, st: os.stat_result) -> Arrival | None:
        if rel not in self._names:  # printer and job as written, unless not UTF-8: escaped
            raw = text_name(rel)
            self._names[rel] = parse_inbox_path(raw if is_utf8(raw) else rel, self.pattern)
        name = self._names[rel]
        if name is None:
            return None
        marker = path.name == self.marker
        layer = None if marker else name.layer
        problem = None if marker else name_problem(rel, layer)
        if problem is not None and layer is not None and layer > MAX_LAYER:
            layer = None
        return Arrival(
            path, rel, name.printer, name.job, layer, st.st_size, st.st_mtime, marker, problem
        )

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
                    if name_text(folder) in skip:
                        continue
                    for f in _entries(job, dirs=False):
                        rel = name_text(f"{folder}/{f.name}")
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
    # files, links, FIFOs... and folders named like an image (recorded as failed, not skipped)
    return [e for e in keep if not e.is_dir(follow_symlinks=True) or _image_named(e.name)]


def _image_named(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _order(a: Arrival, job_first: float) -> tuple:
    layer = -1 if a.layer is None else a.layer
    return (a.marker, a.printer, job_first, a.job, layer, a.mtime, natural_key(a.rel))


def name_problem(rel: str, layer: int | None) -> str | None:
    """Why a path (``rel``: as text, see ``layout.name_text``) cannot be a layer as it is."""
    if not is_utf8(text_name(rel)):
        raw = os.fsencode(text_name(rel))
        return f"file name {raw!r} is not valid UTF-8 (kept as {rel!r}); rename it in UTF-8"
    if _ODD.search(rel):
        return f"file name {rel!r} contains control characters; rename it without them"
    if layer is not None and layer > MAX_LAYER:
        return f"layer number {layer} in {rel!r} is out of range: use at most {MAX_LAYER}"
    return None


def inside(path: Path, root: Path) -> bool:
    """True when ``path`` (following symlinks) lies inside ``root``."""
    try:
        return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))
    except OSError:
        return False
