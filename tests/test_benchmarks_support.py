"""Fast checks of ``benchmarks/support.py``: the machine, results files and doc sections."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

SUPPORT = Path(__file__).resolve().parents[1] / "benchmarks" / "support.py"
QUALITY = ("<!-- quality:{} begin -->", "<!-- quality:{} end -->")
SPEED = ("<!-- {}:begin -->", "<!-- {}:end -->")


@pytest.fixture(scope="module")
def support():
    spec = importlib.util.spec_from_file_location("benchmarks_support", SUPPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("markers", [QUALITY, SPEED], ids=["quality", "speed"])
def test_section_replaces_only_its_own_block_or_appends(support, tmp_path, markers):
    def write(name: str, text: str) -> None:
        begin, end = (m.format(name) for m in markers)
        support.write_section(doc, begin, end, text, "# Title")

    doc = tmp_path / "doc.md"
    a_begin, a_end = (m.format("a") for m in markers)
    doc.write_text(f"# Title\n\nintro\n\n{a_begin}\nold\n{a_end}\n\ntail\n")
    write("a", "new")
    assert doc.read_text() == f"# Title\n\nintro\n\n{a_begin}\nnew\n{a_end}\n\ntail\n"
    write("b", "added\n")  # absent: appended after everything, once
    b_begin, b_end = (m.format("b") for m in markers)
    assert doc.read_text().endswith(f"tail\n\n{b_begin}\nadded\n{b_end}\n")
    write("b", "again")
    text = doc.read_text()
    assert text.count(b_begin) == 1 and "again" in text and "added" not in text
    assert text.startswith(f"# Title\n\nintro\n\n{a_begin}\nnew\n{a_end}\n\ntail\n")


def test_section_of_a_new_doc_starts_with_its_title(support, tmp_path):
    doc = tmp_path / "new.md"
    support.write_section(doc, "<!-- x:begin -->", "<!-- x:end -->", "body", "# Speed")
    assert doc.read_text() == "# Speed\n\n<!-- x:begin -->\nbody\n<!-- x:end -->\n"


def test_results_round_trip(support, tmp_path):
    assert support.load_results(tmp_path, "bench") == {}
    results = {"machine": {"cores": 2}, "z": [1.5, None], "a": {"path": tmp_path}}
    path = support.save_results(tmp_path / "results", "bench", results)
    assert path == tmp_path / "results" / "bench.json"
    loaded = support.load_results(tmp_path / "results", "bench")
    assert loaded == results | {"a": {"path": str(tmp_path)}}  # paths as their text
    assert list(loaded) == ["machine", "z", "a"]  # the benchmark's order, not sorted
    assert not [p for p in path.parent.iterdir() if p != path]  # no temp file left


def test_machine_and_its_line(support):
    m = support.machine()
    keys = ("cpu", "cpu_flags", "cores", "load", "system", "platform", "python", "torch")
    assert set(keys + ("onnxruntime", "openvino", "numpy", "date")) <= set(m)
    assert m["cores"] == os.cpu_count() and m["date"].endswith(" UTC")
    line = support.machine_line(m)
    assert f"{m['cores']} cores" in line and m["date"] in line and m["cpu"] in line
    assert f"torch {m['torch']}" in line and f"onnxruntime {m['onnxruntime']}" in line
    assert ("OpenVINO" in line) == bool(m["openvino"])
    assert "(3 threads)" in support.machine_line(m | {"torch_threads": 3})


def test_machine_line_of_older_results(support):
    old = {"cpus": 2, "processor": "x86_64", "torch": "2.1", "onnxruntime": "1.2", "date": "d"}
    line = support.machine_line(old)
    assert line.startswith("x86_64, 2 cores;") and line.endswith("; d")
    assert support.machine_line("AMD EPYC (avx2), 2 cores") == "AMD EPYC (avx2), 2 cores"
