"""Download the public layer-image data sets from their source and check them file by file.

The project never ships the images. ``fetch`` downloads the GitHub archive of the pinned commit,
extracts the data-set files into a hidden temporary folder beside ``<dest_root>/<name>``,
checks every file against the committed checksum list (``checksums/<name>.sha256``, in
``sha256sum`` format) and only then renames the folder into place, so ``<dest_root>/<name>``
either holds the complete, verified data set or does not exist.

Where the files lie in each repository (``Source.path_map``):

- pblm: ``data/<class folder>/*.jpg`` -> ``pblm/<class folder>/``; ``LICENSE`` -> ``pblm/LICENSE``.
- snu_fdm: ``dataset/FDM_Dataset_v1/{train,valid,test}/{success,failure}/`` -> ``snu_fdm/...``;
  ``dataset/CITATION.cff`` -> ``snu_fdm/CITATION.cff``.

Files of the checksum list that the map does not find are looked up by their relative path
anywhere in the archive, so a different prefix (another archive layout, a mirror) still works.

Offline use: download the archive elsewhere and pass it as ``--url file:///path/to/archive.zip``,
or copy the files into ``<dest_root>/<name>`` by hand and check them with ``--verify-only``.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import logging
import os
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from inspect3d.data.layout import IMAGE_EXTENSIONS
from inspect3d.errors import InspectError
from inspect3d.io import write_text_atomic

log = logging.getLogger(__name__)

CHECKSUM_PACKAGE = "inspect3d.data"
CHECKSUM_DIR = "checksums"
DATA_ROOT_ENV = "INSPECT3D_DATA_ROOT"
DEFAULT_DATA_ROOT = "data"
DEFAULT_TIMEOUT_S = 60.0
METADATA_PREFIXES = ("LICENSE", "CITATION")
URL_SCHEMES = ("https", "http", "file")

_CHUNK = 1 << 20
_MAX_LISTED = 5
_CHECKSUM_LINE = re.compile(r"^(?P<digest>[0-9a-f]{64}) [ *](?P<path>.+)$")


def github_archive_url(repo: str, commit: str) -> str:
    """URL of the zip archive GitHub builds for ``repo`` ("owner/name") at ``commit``."""
    return f"https://github.com/{repo}/archive/{commit}.zip"


@dataclass(frozen=True)
class Source:
    """Where a data set comes from and where its files lie in the source archive.

    ``path_map`` pairs an in-repository path with a path inside the local data-set folder;
    an in-repository path ending in ``/`` maps a whole folder, any other a single file.
    ``checksum_file`` overrides the packaged list ``checksums/<name>.sha256`` (tests, mirrors).
    """

    name: str
    repo: str
    commit: str
    url: str
    license_note: str
    path_map: tuple[tuple[str, str], ...] = ()
    checksum_file: Path | None = None


DATASETS: dict[str, Source] = {
    "pblm": Source(
        name="pblm",
        repo="bclegend/PBLM",
        commit="1948f7f",
        url=github_archive_url("bclegend/PBLM", "1948f7f"),
        license_note="MIT License (Copyright (c) 2024 Brian Cheng); see pblm/LICENSE.",
        path_map=(("data/", ""), ("LICENSE", "LICENSE")),
    ),
    "snu_fdm": Source(
        name="snu_fdm",
        repo="hyungjungkim/systematic-deep-transfer-learning-for-fdm-defect-detection",
        commit="b1a9ab8",
        url=github_archive_url(
            "hyungjungkim/systematic-deep-transfer-learning-for-fdm-defect-detection", "b1a9ab8"
        ),
        license_note=(
            "NO LICENSE FILE: the repository grants no license. Use these images for internal "
            "development and evaluation only; do not redistribute them or ship models trained "
            "on them. Cite Kim, Lee & Ahn, J. Manuf. Syst. 65 (2022) 439-451 (CITATION.cff)."
        ),
        path_map=(("dataset/FDM_Dataset_v1/", ""), ("dataset/CITATION.cff", "CITATION.cff")),
    ),
}


# --- sources and checksum lists -------------------------------------------------------------


def get_source(name: str | Source) -> Source:
    """The ``Source`` called ``name`` (a ``Source`` is returned as is)."""
    if isinstance(name, Source):
        return name
    try:
        return DATASETS[name]
    except KeyError:
        valid = ", ".join(sorted(DATASETS))
        raise InspectError(f"unknown data set {name!r}; valid names: {valid}") from None


def is_listed_file(rel_path: str) -> bool:
    """Whether a data-set file belongs in a checksum list: an image or a LICENSE/CITATION file."""
    name = PurePosixPath(rel_path).name
    if name.startswith("."):
        return False
    return name.lower().endswith(IMAGE_EXTENSIONS) or name.upper().startswith(METADATA_PREFIXES)


def _is_image_name(rel_path: str) -> bool:
    name = PurePosixPath(rel_path).name
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _is_safe_relpath(rel_path: str) -> bool:
    """A relative posix path that stays inside its folder (no '..', no absolute path)."""
    if not rel_path or rel_path.startswith("/") or "\\" in rel_path or "\n" in rel_path:
        return False
    parts = rel_path.split("/")
    return all(part not in ("", ".", "..") for part in parts)


def parse_checksums(text: str, origin: str = "<checksums>") -> dict[str, str]:
    """Parse ``sha256sum`` output (``<hex>  <relative path>`` lines) into {path: hex digest}."""
    entries: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        m = _CHECKSUM_LINE.match(line)
        if m is None or not _is_safe_relpath(m["path"]):
            raise InspectError(
                f"{origin}, line {number}: {line!r} is not a checksum line; expected "
                "'<64 lower-case hex digits>  <relative posix path inside the data set>'"
            )
        entries[m["path"]] = m["digest"]
    return entries


def format_checksums(entries: Mapping[str, str]) -> str:
    """``sha256sum``-format text for {relative path: hex digest}, sorted by path."""
    return "".join(f"{entries[path]}  {path}\n" for path in sorted(entries))


def load_checksums(name: str | Source) -> dict[str, str]:
    """The checksum list of a data set: {relative posix path: sha256 hex digest}."""
    source = get_source(name)
    if source.checksum_file is not None:
        origin = str(source.checksum_file)
        try:
            text = Path(source.checksum_file).read_text(encoding="utf-8")
        except OSError as err:
            raise InspectError(f"cannot read checksum list {origin}: {err}") from err
    else:
        resource = resources.files(CHECKSUM_PACKAGE) / CHECKSUM_DIR / f"{source.name}.sha256"
        origin = f"{CHECKSUM_PACKAGE}/{CHECKSUM_DIR}/{source.name}.sha256"
        try:
            text = resource.read_text(encoding="utf-8")
        except (FileNotFoundError, NotADirectoryError) as err:
            raise InspectError(
                f"no checksum list {origin} for data set {source.name!r}; create it with "
                f"scripts/make_checksums.py from a trusted copy of the data set"
            ) from err
    entries = parse_checksums(text, origin)
    if not entries:
        raise InspectError(f"checksum list {origin} is empty; it must list the data-set files")
    return entries


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _listed_files(folder: Path) -> list[str]:
    """Relative posix paths of the files under ``folder`` that a checksum list covers."""
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        if path.is_file() and is_listed_file(rel):
            found.append(rel)
    return sorted(found)


def compute_checksums(folder: str | os.PathLike) -> dict[str, str]:
    """{relative posix path: sha256} of every image and LICENSE/CITATION file under ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InspectError(f"{folder} is not a folder; give the local copy of a data set")
    entries = {}
    for rel in _listed_files(folder):
        if not _is_safe_relpath(rel):
            raise InspectError(f"file name {rel!r} cannot go in a checksum list (no newlines)")
        entries[rel] = sha256_file(folder / rel)
    if not entries:
        raise InspectError(f"{folder} holds no images; give the local copy of a data set")
    return entries


def write_checksums(
    name: str, folder: str | os.PathLike, out_dir: str | os.PathLike | None = None
) -> Path:
    """Write ``<out_dir>/<name>.sha256`` for the local copy in ``folder`` (default: package dir)."""
    source = get_source(name)
    out = Path(out_dir) if out_dir is not None else Path(__file__).with_name(CHECKSUM_DIR)
    entries = compute_checksums(folder)
    return write_text_atomic(out / f"{source.name}.sha256", format_checksums(entries))


# --- verification ---------------------------------------------------------------------------


def verify(name: str | Source, folder: str | os.PathLike, progress: bool = False) -> list[str]:
    """Problems of a local data-set folder against its checksum list; empty when it is intact.

    Each problem is one line: ``missing file: <path>``, ``checksum mismatch: <path>`` or
    ``extra image: <path>`` (an image that the list does not know).
    """
    expected = load_checksums(name)
    folder = Path(folder)
    if not folder.is_dir():
        return [f"not a folder: {folder}"]
    problems = []
    for rel in tqdm(sorted(expected), desc="verify", unit="file", disable=not progress):
        path = folder.joinpath(*rel.split("/"))
        if not path.is_file():
            problems.append(f"missing file: {rel}")
        elif sha256_file(path) != expected[rel]:
            problems.append(f"checksum mismatch: {rel}")
    extra = [rel for rel in _listed_files(folder) if rel not in expected and _is_image_name(rel)]
    problems.extend(f"extra image: {rel}" for rel in extra)
    return problems


def summarize_problems(problems: list[str], limit: int = _MAX_LISTED) -> str:
    """The first ``limit`` problems joined by '; ', with a count of the rest."""
    shown = "; ".join(problems[:limit])
    rest = len(problems) - limit
    return f"{shown}; and {rest} more" if rest > 0 else shown


# --- archive layout -------------------------------------------------------------------------


def _strip_top_folder(members: Iterable[str]) -> dict[str, str]:
    """{member name: in-repository path}, dropping the single top folder GitHub archives have."""
    members = list(members)
    tops = {m.split("/", 1)[0] for m in members}
    if len(tops) == 1 and all("/" in m for m in members):
        return {m: m.split("/", 1)[1] for m in members}
    return {m: m for m in members}


def map_repo_path(repo_path: str, path_map: Iterable[tuple[str, str]]) -> str | None:
    """Local relative path of an in-repository path under ``path_map``, or None if unmapped."""
    for repo_prefix, local in path_map:
        if repo_prefix.endswith("/"):
            if repo_path.startswith(repo_prefix):
                rest = repo_path[len(repo_prefix) :]
                return f"{local.rstrip('/')}/{rest}" if local else rest
        elif repo_path == repo_prefix:
            return local
    return None


def _locate_by_suffix(repo_paths: Mapping[str, str], wanted: Iterable[str]) -> dict[str, str]:
    """Find each wanted relative path as the tail of an in-archive path (shortest path wins)."""
    index: dict[str, list[str]] = {}
    for member, repo_path in repo_paths.items():
        parts = repo_path.split("/")
        for start in range(len(parts)):
            index.setdefault("/".join(parts[start:]), []).append(member)
    found = {}
    for rel in wanted:
        candidates = index.get(rel)
        if candidates:
            found[rel] = min(candidates, key=lambda m: (repo_paths[m].count("/"), m))
    return found


def plan_extraction(
    members: Iterable[str], expected: Mapping[str, str], path_map: Iterable[tuple[str, str]]
) -> dict[str, str]:
    """{local relative path: archive member} for the data-set files of an archive.

    Files under ``path_map`` are taken when the checksum list names them or they are images
    (so verification can report extra images); listed files the map misses are then located
    by their relative path anywhere in the archive.
    """
    path_map = tuple(path_map)
    repo_paths = _strip_top_folder(m for m in members if not m.endswith("/"))
    plan: dict[str, str] = {}
    for member, repo_path in sorted(repo_paths.items()):
        rel = map_repo_path(repo_path, path_map)
        if rel and _is_safe_relpath(rel) and (rel in expected or _is_image_name(rel)):
            plan.setdefault(rel, member)
    missing = [rel for rel in expected if rel not in plan]
    plan.update(_locate_by_suffix(repo_paths, missing))
    return plan


def describe_layout(source: Source, dest: Path) -> str:
    """Human-readable 'in-repo path -> local path' lines of a source's ``path_map``."""
    lines = [f"  {repo_path or '.'} -> {dest / local}" for repo_path, local in source.path_map]
    return "\n".join(lines)


# --- download and extraction ----------------------------------------------------------------


def _check_url(url: str) -> None:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in URL_SCHEMES:
        raise InspectError(
            f"URL {url!r} has scheme {scheme!r}; use one of {', '.join(URL_SCHEMES)} "
            "(e.g. file:///path/to/archive.zip for an archive downloaded elsewhere)"
        )


def _manual_hint(source: Source, dest: Path) -> str:
    listed = sorted(load_checksums(source))
    example = next((rel for rel in listed if _is_image_name(rel)), listed[0])
    return (
        f"To install it without this download: fetch {source.url} (the archive of "
        f"{source.repo} at commit {source.commit}) on a machine with internet, then either run "
        f"`inspect3d fetch {source.name} --url file:///path/to/archive.zip --dest {dest.parent}`, "
        f"or unzip it and copy the files so that e.g. {dest / example} exists:\n"
        f"{describe_layout(source, dest)}\n"
        f"and check them with `inspect3d fetch {source.name} --verify-only --dest {dest.parent}`."
    )


def download(url: str, target: Path, timeout: float, progress: bool, label: str) -> None:
    """Stream ``url`` into the file ``target`` with a progress bar; network errors propagate."""
    with urllib.request.urlopen(url, timeout=timeout) as response, open(target, "wb") as out:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=label,
            disable=not progress,
        ) as bar:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                bar.update(len(chunk))


def _download_archive(
    source: Source, url: str, target: Path, dest: Path, timeout: float, progress: bool
) -> None:
    try:
        download(url, target, timeout, progress, label=f"download {source.name}")
    except (OSError, ValueError, http.client.HTTPException) as err:  # URLError is an OSError
        raise InspectError(
            f"could not download data set {source.name!r} from {url}: {err}.\n"
            f"{_manual_hint(source, dest)}"
        ) from err


def extract(
    archive: Path, staged: Path, source: Source, expected: Mapping[str, str], progress: bool
) -> int:
    """Extract the data-set files of ``archive`` into the new folder ``staged``; return count."""
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as err:
        raise InspectError(
            f"the download for data set {source.name!r} is not a zip archive ({err}); "
            "give the URL of a GitHub zip archive (.../archive/<commit>.zip)"
        ) from err
    with zf:
        plan = plan_extraction(zf.namelist(), expected, source.path_map)
        staged.mkdir(parents=True)
        for rel, member in tqdm(
            sorted(plan.items()), desc="extract", unit="file", disable=not progress
        ):
            target = staged.joinpath(*rel.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
    return len(plan)


def _publish(staged: Path, dest: Path, work: Path) -> None:
    """Rename ``staged`` onto ``dest``; an old ``dest`` is moved into ``work`` and restored on
    failure (``work`` is deleted afterwards by the caller)."""
    previous = work / "previous"
    if dest.exists():
        os.rename(dest, previous)
    try:
        os.rename(staged, dest)
    except OSError as err:
        if previous.exists():
            os.rename(previous, dest)
        raise InspectError(f"could not move the verified data set into {dest}: {err}") from err


def notice(source: Source) -> str:
    """The license notice of a data set (``inspect3d fetch`` prints it on stderr)."""
    return f"{source.name}: {source.repo}@{source.commit}. {source.license_note}"


def fetch(
    name: str | Source,
    dest_root: str | os.PathLike,
    url: str | None = None,
    force: bool = False,
    progress: bool = True,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Path:
    """Download, verify and install a data set as ``<dest_root>/<name>``; return that folder.

    An existing folder that verifies is returned without downloading unless ``force``.
    ``url`` replaces the source URL (a mirror, or ``file://`` for an archive fetched
    elsewhere). Nothing is moved into place unless every file matches the checksum list.
    """
    source = get_source(name)
    dest = Path(dest_root) / source.name
    expected = load_checksums(source)
    log.info("%s", notice(source))
    if dest.exists() and not force:
        problems = verify(source, dest, progress=progress)
        if not problems:
            return dest
        raise InspectError(
            f"{dest} exists but does not match the checksum list of {source.name!r} "
            f"({len(problems)} problems: {summarize_problems(problems)}); fix it by hand or "
            "re-run with --force (force=True) to replace it with a fresh download"
        )
    url = url or source.url
    _check_url(url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{source.name}.", suffix=".partial", dir=dest.parent))
    try:
        archive = work / "archive.zip"
        _download_archive(source, url, archive, dest, timeout, progress)
        staged = work / source.name
        extract(archive, staged, source, expected, progress)
        archive.unlink()
        problems = verify(source, staged, progress=progress)
        if problems:
            raise InspectError(
                f"the archive from {url} does not match the checksum list of {source.name!r} "
                f"({len(problems)} problems: {summarize_problems(problems)}); nothing was "
                f"installed in {dest}. Check the URL and commit ({source.repo}@{source.commit})."
            )
        _publish(staged, dest, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


# --- command line ---------------------------------------------------------------------------


def default_data_root() -> str:
    """``$INSPECT3D_DATA_ROOT`` if set, else ``data``."""
    return os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT


def build_parser() -> argparse.ArgumentParser:
    """Parser of ``inspect3d fetch``."""
    parser = argparse.ArgumentParser(
        prog="inspect3d fetch",
        description="Download a public layer-image data set and verify it against its checksums.",
    )
    parser.add_argument("name", help=f"data set: {', '.join(sorted(DATASETS))}")
    parser.add_argument(
        "--dest",
        default=None,
        help=f"data root; the set goes to DEST/NAME (default: ${DATA_ROOT_ENV} or 'data')",
    )
    parser.add_argument("--url", default=None, help="download from this URL instead (file:// ok)")
    parser.add_argument("--force", action="store_true", help="re-download even if present")
    parser.add_argument(
        "--verify-only", action="store_true", help="only check DEST/NAME, download nothing"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _verify_command(name: str, dest_root: Path, progress: bool) -> int:
    folder = dest_root / get_source(name).name
    problems = verify(name, folder, progress=progress)
    if problems:
        print(f"{folder}: {len(problems)} problems", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(f"{folder}: all {len(load_checksums(name))} files match")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``inspect3d fetch NAME [--dest DIR] [--url URL] [--force] [--verify-only]``: 0 when the
    set is in place, 1 when ``--verify-only`` finds problems; bad input raises InspectError
    (the CLI's exit 2, as for every command)."""
    args = build_parser().parse_args(argv)
    dest_root = Path(args.dest if args.dest is not None else default_data_root())
    if args.verify_only:
        return _verify_command(args.name, dest_root, progress=not args.quiet)
    print(notice(get_source(args.name)), file=sys.stderr)
    path = fetch(args.name, dest_root, url=args.url, force=args.force, progress=not args.quiet)
    print(f"{args.name}: verified in {path}")
    return 0
