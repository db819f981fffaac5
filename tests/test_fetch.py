"""Data-set fetcher: download through a URL, verify against checksums, install atomically.

The real download needs internet; here a small zip laid out like a GitHub archive is served
through ``file://`` and a loopback HTTP server, which take the same code path.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from inspect3d.cli import main as cli_main
from inspect3d.data import fetch as fetch_mod
from inspect3d.data.fetch import (
    DATASETS,
    Source,
    fetch,
    format_checksums,
    load_checksums,
    main,
    plan_extraction,
    verify,
)
from inspect3d.errors import InspectError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"

COMMIT = "0123abc"
FILES = {
    "No_Defect/converted_ 0000.jpg": b"\xff\xd8 layer zero",
    "No_Defect/converted_ 0001.jpg": b"\xff\xd8 layer one",
    "Powder Uneven_With_Scratch/converted_ 0000.jpg": b"\xff\xd8 scratched",
    "Powder_Uneven/converted_ 0007.JPG": b"\xff\xd8 upper-case extension",
    "LICENSE": b"MIT License\n",
}


def _repo_path(rel: str) -> str:
    """Where the toy repository keeps a data-set file (images under data/, LICENSE at root)."""
    return rel if rel == "LICENSE" else f"data/{rel}"


def make_archive(path: Path, files: dict[str, bytes], top: str = f"toy-{COMMIT}") -> Path:
    """A zip laid out like a GitHub archive: ``<repo>-<commit>/<in-repo path>``."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{top}/", b"")
        zf.writestr(f"{top}/README.md", b"# toy\n")
        zf.writestr(f"{top}/train.py", b"print('not data')\n")
        for rel, data in files.items():
            zf.writestr(f"{top}/{_repo_path(rel)}", data)
    return path


@pytest.fixture
def source(tmp_path: Path) -> Source:
    """A toy data set whose checksum list is written for the test."""
    entries = {rel: hashlib.sha256(data).hexdigest() for rel, data in FILES.items()}
    checksum_file = tmp_path / "toy.sha256"
    checksum_file.write_text(format_checksums(entries), encoding="utf-8")
    return Source(
        name="toy",
        repo="example/toy",
        commit=COMMIT,
        url="file:///nonexistent/toy.zip",
        license_note="test data, no license",
        path_map=(("data/", ""), ("LICENSE", "LICENSE")),
        checksum_file=checksum_file,
    )


@pytest.fixture
def archive_url(tmp_path: Path) -> str:
    return make_archive(tmp_path / "toy.zip", FILES).as_uri()


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loopback HTTP server serving a folder: (base URL, folder)."""
    folder = tmp_path / "www"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", folder
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _local_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_fetch_file_url_installs_verified_layout(source, archive_url, tmp_path):
    dest_root = tmp_path / "data"
    out = fetch(source, dest_root, url=archive_url, progress=False)
    assert out == dest_root / "toy"
    assert _local_files(out) == FILES  # no README.md / train.py, spaces kept
    assert sorted(p.name for p in dest_root.iterdir()) == ["toy"]  # no temp folders left
    assert verify(source, out) == []


def test_fetch_over_loopback_http(source, http_root, tmp_path):
    base, folder = http_root
    make_archive(folder / "toy.zip", FILES)
    out = fetch(source, tmp_path / "data", url=f"{base}/toy.zip", progress=False)
    assert _local_files(out) == FILES


def test_tampered_file_fails_and_installs_nothing(source, tmp_path):
    files = dict(FILES)
    files["No_Defect/converted_ 0001.jpg"] = b"\xff\xd8 edited"
    url = make_archive(tmp_path / "bad.zip", files).as_uri()
    dest_root = tmp_path / "data"
    with pytest.raises(InspectError, match=r"checksum mismatch: No_Defect/converted_ 0001\.jpg"):
        fetch(source, dest_root, url=url, progress=False)
    assert list(dest_root.iterdir()) == []


def test_missing_and_extra_images_are_named(source, tmp_path):
    files = {k: v for k, v in FILES.items() if not k.startswith("Powder_Uneven/")}
    files["No_Defect/converted_ 0002.jpg"] = b"\xff\xd8 not in the list"
    url = make_archive(tmp_path / "bad.zip", files).as_uri()
    with pytest.raises(InspectError) as info:
        fetch(source, tmp_path / "data", url=url, progress=False)
    message = str(info.value)
    assert "missing file: Powder_Uneven/converted_ 0007.JPG" in message
    assert "extra image: No_Defect/converted_ 0002.jpg" in message
    assert list((tmp_path / "data").iterdir()) == []


def test_verified_folder_is_not_downloaded_again(source, archive_url, tmp_path):
    dest_root = tmp_path / "data"
    fetch(source, dest_root, url=archive_url, progress=False)
    missing_url = (tmp_path / "does-not-exist.zip").as_uri()
    assert fetch(source, dest_root, url=missing_url, progress=False) == dest_root / "toy"


def test_force_replaces_and_broken_folder_needs_force(source, archive_url, tmp_path):
    dest_root = tmp_path / "data"
    out = fetch(source, dest_root, url=archive_url, progress=False)
    (out / "No_Defect" / "converted_ 0000.jpg").write_bytes(b"damaged")
    with pytest.raises(InspectError, match="--force"):
        fetch(source, dest_root, url=archive_url, progress=False)
    fetch(source, dest_root, url=archive_url, force=True, progress=False)
    assert _local_files(out) == FILES
    assert sorted(p.name for p in dest_root.iterdir()) == ["toy"]


def test_download_failure_explains_manual_install(source, tmp_path):
    dest_root = tmp_path / "data"
    with pytest.raises(InspectError) as info:
        fetch(source, dest_root, url=(tmp_path / "nope.zip").as_uri(), progress=False)
    message = str(info.value)
    assert "could not download" in message and "--verify-only" in message
    assert str(dest_root / "toy") in message and "file://" in message
    assert list(dest_root.iterdir()) == []


def test_not_a_zip_is_a_clear_error(source, tmp_path):
    junk = tmp_path / "page.html"
    junk.write_text("<html>rate limited</html>")
    with pytest.raises(InspectError, match="not a zip archive"):
        fetch(source, tmp_path / "data", url=junk.as_uri(), progress=False)
    assert list((tmp_path / "data").iterdir()) == []


def test_unknown_prefix_is_located_from_checksum_paths(source, tmp_path):
    """Files under an unexpected in-repo folder are still found by their relative paths."""
    moved = dataclasses.replace(source, path_map=(("elsewhere/", ""),))
    url = make_archive(tmp_path / "toy.zip", FILES, top="mirror-of-toy").as_uri()
    out = fetch(moved, tmp_path / "data", url=url, progress=False)
    assert _local_files(out) == FILES


def test_plan_prefers_shortest_match():
    members = ["r-1/LICENSE", "r-1/vendor/x/LICENSE", "r-1/data/a/1.jpg"]
    plan = plan_extraction(members, {"LICENSE": "0" * 64, "a/1.jpg": "0" * 64}, ())
    assert plan == {"LICENSE": "r-1/LICENSE", "a/1.jpg": "r-1/data/a/1.jpg"}


def test_unknown_name_lists_valid_names(tmp_path):
    with pytest.raises(InspectError, match=r"unknown data set 'nope'.*pblm, snu_fdm"):
        fetch("nope", tmp_path, progress=False)
    with pytest.raises(InspectError, match="pblm, snu_fdm"):
        verify("nope", tmp_path)


def test_cli_fetch_and_verify_only(source, archive_url, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(DATASETS, "toy", source)
    monkeypatch.setenv("INSPECT3D_DATA_ROOT", str(tmp_path / "env-root"))
    assert main(["toy", "--verify-only", "--quiet"]) == 1
    assert main(["toy", "--url", archive_url, "--quiet"]) == 0
    assert (tmp_path / "env-root" / "toy" / "LICENSE").is_file()
    assert main(["toy", "--dest", str(tmp_path / "env-root"), "--verify-only"]) == 0
    assert cli_main(["fetch", "nope"]) == 2  # bad input: exit 2, as for every command
    err = capsys.readouterr().err
    assert "test data, no license" in err and "valid names: pblm, snu_fdm" in err


def test_real_sources_are_pinned_archives():
    for name, src in DATASETS.items():
        assert src.name == name and src.commit in src.url and src.url.endswith(".zip")
        assert src.license_note
    assert "internal" in DATASETS["snu_fdm"].license_note
    pblm, snu = load_checksums("pblm"), load_checksums("snu_fdm")
    assert len(pblm) == 1957 + 1 and "LICENSE" in pblm
    assert "Powder Uneven_With_Scratch/converted_ 0000.jpg" in pblm
    assert len(snu) == 327 + 1 and "CITATION.cff" in snu
    assert {p.split("/")[0] for p in snu if "/" in p} == {"train", "valid", "test"}


def test_real_archive_layout_maps_to_local_layout():
    """The in-repo paths of the real archives map onto the committed checksum paths."""
    for name, repo_paths in {
        "pblm": ["data/Powder Uneven_With_Scratch/converted_ 0000.jpg", "LICENSE"],
        "snu_fdm": [
            "dataset/FDM_Dataset_v1/valid/failure/failure (121).JPG",
            "dataset/CITATION.cff",
        ],
    }.items():
        src = DATASETS[name]
        members = [f"{src.repo.split('/')[1]}-{src.commit}/{p}" for p in repo_paths]
        plan = plan_extraction(members, load_checksums(name), src.path_map)
        mapped = {fetch_mod.map_repo_path(p, src.path_map) for p in repo_paths}
        assert mapped <= set(load_checksums(name)) and set(plan) == mapped


@pytest.mark.real_data
@pytest.mark.parametrize("name", ["pblm", "snu_fdm"])
def test_committed_checksums_match_shared_copy(name):
    folder = SHARED / name
    if not folder.is_dir():
        pytest.skip(f"real data set not found at {folder} (needs ../shared/datasets)")
    assert verify(name, folder) == []
