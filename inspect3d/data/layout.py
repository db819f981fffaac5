"""Where job and layer numbers come from in file names: the one place that parses them.

Conventions (documented in the README):
- ``<job>__<layer>.<ext>`` (double underscore): job and layer are known, e.g. ``job007__0012.png``.
- anything else ending in digits, e.g. ``converted_ 0033.jpg``: layer 33, job unknown.
- no digits: neither is known; order then follows the natural sort of names.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

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
    return (
        path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
    )


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
    None when the pattern does not match the whole path. A backslash is an ordinary character
    of a POSIX name (a folder ``a\\b`` is one folder), not a separator."""
    m = pattern.fullmatch(str(rel_path))
    if m is None or not m["printer"] or not m["job"]:
        return None
    layer = m.groupdict().get("layer")
    return InboxName(printer=m["printer"], job=m["job"], layer=int(layer) if layer else None)


# --- names as text: file names of any bytes, and folder names made from printer/job names -----

MAX_LAYER = 2**63 - 1  # the largest layer number SQLite stores (INTEGER is 64-bit signed)
_ESCAPED = re.compile(r"\\(\\|x[0-9a-f]{2})")


def name_text(name: str) -> str:
    """A file name (``str`` from ``os`` calls, non-UTF-8 bytes as surrogates) as plain text
    that SQLite and JSON can hold, losslessly (``text_name`` gives the name back).

    Names that are valid UTF-8 and hold no backslash stay as they are (every existing record
    keeps its key); any other name has its backslashes doubled and each byte that is not UTF-8
    written ``\\xNN``, so an escaped name (it holds a backslash) never equals a kept one.
    """
    if "\\" not in name and is_utf8(name):
        return name
    raw = name.encode("utf-8", "surrogateescape")
    out = []
    for part in raw.decode("utf-8", "surrogateescape"):
        if part == "\\":
            out.append("\\\\")
        elif not is_utf8(part):
            out.append(f"\\x{part.encode('utf-8', 'surrogateescape')[0]:02x}")
        else:
            out.append(part)
    return "".join(out)


def text_name(text: str) -> str:
    """The file name (``str`` for ``os`` calls) that ``name_text`` wrote as ``text``."""
    if "\\" not in text:
        return text

    def unescape(m: re.Match[str]) -> str:
        token = m[1]
        return (
            "\\"
            if token == "\\"
            else bytes([int(token[1:], 16)]).decode("utf-8", "surrogateescape")
        )

    return _ESCAPED.sub(unescape, text)


def is_utf8(name: str) -> bool:
    """False for a name from ``os`` calls that holds bytes that are not UTF-8 (surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_FOLDER_SAFE = string.ascii_letters + string.digits + "._-"


def folder_name(name: str) -> str:
    """A printer or job name as one folder name: collision-free and reversible (``from_folder``).

    Everything outside ``[A-Za-z0-9._-]`` is percent-encoded (UTF-8), and a leading ``.`` too
    (no hidden folder, no ``.``/``..``); ``c<1>`` and ``c>1<`` stay two folders.
    """
    text = quote(name, safe=_FOLDER_SAFE, errors="surrogateescape")
    if text.startswith("."):
        text = "%2E" + text[1:]
    return text or "%"  # "" (never a printer or job name) still names a folder


def from_folder(folder: str) -> str:
    """The printer or job name that ``folder_name`` wrote as ``folder``."""
    return "" if folder == "%" else unquote(folder, errors="surrogateescape")


def legacy_folder_name(name: str) -> str:
    """The folder name evidence was written under before ``folder_name`` (lossy: it could
    collide); readers still look there for evidence of old jobs."""
    return "".join(c if c.isalnum() or c in "-_. " else "_" for c in name).strip(". ") or "_"
