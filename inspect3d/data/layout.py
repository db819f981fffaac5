"""Where job and layer numbers come from in file names: the one place that parses them.

Conventions (documented in the README):
- ``<job>__<layer>.<ext>`` (double underscore): job and layer are known, e.g. ``job007__0012.png``.
- anything else ending in digits, e.g. ``converted_ 0033.jpg``: layer 33, job unknown.
- no digits: neither is known; order then follows the natural sort of names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from inspect3d.errors import InspectError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

_JOB_LAYER = re.compile(r"^(?P<job>.+?)__(?P<layer>\d+)$")
_TRAILING_NUMBER = re.compile(r"(?P<layer>\d+)\D*$")
_DIGITS = re.compile(r"(\d+)")


@dataclass(frozen=True)
class LayerName:
    job: str | None
    layer: int | None


def parse_layer_name(path: str | Path) -> LayerName:
    """Job and layer number encoded in a layer image's file name (either may be unknown)."""
    stem = Path(path).stem
    m = _JOB_LAYER.match(stem)
    if m:
        return LayerName(job=m["job"], layer=int(m["layer"]))
    m = _TRAILING_NUMBER.search(stem)
    return LayerName(job=None, layer=int(m["layer"]) if m else None)


def layer_file_name(job: str, layer: int, ext: str = ".png") -> str:
    """The file name that ``parse_layer_name`` reads back as (job, layer)."""
    if "__" in job or "/" in job:
        raise ValueError(f"job name {job!r} may not contain '__' or '/'")
    return f"{job}__{layer:04d}{ext}"


def natural_key(text: str) -> list[object]:
    """Sort key that orders 'layer 9' before 'layer 10'."""
    return [int(t) if t.isdigit() else t.lower() for t in _DIGITS.split(text)]


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (hidden files skipped), in natural order of their names."""
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted((p for p in it if is_image(p)), key=lambda p: natural_key(str(p)))


# --- inbox paths of the watcher: <inbox>/<printer>/<job>/<layer image> ----------------------

# Named groups: ``printer`` and ``job`` (required), ``layer`` (optional: without it layers are
# numbered in order of arrival, e.g. for ``PowderRecoat_20210909_143308.jpg``).
DEFAULT_INBOX_PATTERN = r"(?P<printer>[^/]+)/(?P<job>[^/]+)/(?:[^/]*?(?P<layer>\d+)\D*|[^/]*)"


@dataclass(frozen=True)
class InboxName:
    """Printer, job and (when the name tells) layer number of a file below an inbox."""

    printer: str
    job: str
    layer: int | None


def compile_inbox_pattern(pattern: str = DEFAULT_INBOX_PATTERN) -> re.Pattern[str]:
    """Compile a path pattern (regex on the '/'-separated path relative to the inbox)."""
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise InspectError(
            f"path pattern {pattern!r} is not a valid regular expression: {exc}"
        ) from exc
    missing = {"printer", "job"} - set(rx.groupindex)
    if missing:
        raise InspectError(
            f"path pattern {pattern!r} lacks the named group(s) {sorted(missing)}: it needs "
            "(?P<printer>...) and (?P<job>...), and may have (?P<layer>\\d+)"
        )
    return rx


def parse_inbox_path(rel_path: str, pattern: re.Pattern[str]) -> InboxName | None:
    """(printer, job, layer) of a path relative to the inbox ('/'-separated, extension kept);
    None when the pattern does not match the whole path."""
    m = pattern.fullmatch(str(rel_path).replace("\\", "/"))
    if m is None or not m["printer"] or not m["job"]:
        return None
    layer = m.groupdict().get("layer")
    return InboxName(printer=m["printer"], job=m["job"], layer=int(layer) if layer else None)
