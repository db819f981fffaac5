"""What every benchmark shares: the machine, its results file, its doc section, pyplot.

``benchmarks/quality/common.py`` and ``benchmarks/speed/common.py`` put this folder on
``sys.path`` and import from here; the scripts reach these names through their ``common``.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
from pathlib import Path

from inspect3d.infer.cpu import cpu_name, cpu_summary
from inspect3d.io import write_text_atomic

# the distributions a package ships as (the first one installed gives the version)
DISTRIBUTIONS = {
    "torch": ("torch",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino"),
    "openvino": ("openvino",),
    "numpy": ("numpy",),
}


def _version(package: str) -> str | None:
    """The installed version of ``package`` (without importing it), None where it is absent."""
    for dist in DISTRIBUTIONS[package]:
        try:
            found = importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        return _torch_build(found) if package == "torch" else found.version
    return None


def _torch_build(dist: importlib.metadata.Distribution) -> str:
    """torch's version with its build tag (``2.5.1+cu124``), as ``torch.__version__`` has it,
    read from its ``torch/version.py``; the distribution's version where that file is not."""
    try:
        text = Path(dist.locate_file("torch/version.py")).read_text()
    except OSError:
        return dist.version
    tagged = re.search(r"^__version__ = ['\"](.+?)['\"]", text, re.M)
    return tagged.group(1) if tagged else dist.version


def machine() -> dict:
    """What a figure was measured on (printed, and stored with every result as "machine");
    "openvino" is None where OpenVINO is not installed."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu_name(),
        "cpu_flags": cpu_summary(),
        "cores": os.cpu_count(),
        "load": None if load is None else round(load, 2),
        "system": f"{platform.system()} {platform.machine()}",
        "platform": platform.platform(),
        "python": platform.python_version(),
        **{package: _version(package) for package in DISTRIBUTIONS},
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def machine_line(m: dict | str | None = None) -> str:
    """One line of ``m`` (this machine now by default), e.g. "AMD EPYC 9B14 (avx2 fma), 2 cores,
    load 1.2; Linux x86_64, Python 3.11.7, torch 2.5.1 (2 threads), onnxruntime 1.20.1; 2026-12-01
    18:45 UTC". ``torch_threads`` is shown where a benchmark added it. Results stored before the
    machine was this dict keep their own description: a string as it is, an older dict's
    "processor" and "cpus" in place of "cpu" and "cores"."""
    if m is None:
        m = machine()
    if isinstance(m, str):
        return m
    cpu = m.get("cpu") or m.get("processor", "?")
    flags = f" ({m['cpu_flags']})" if m.get("cpu_flags") else ""
    load = f", load {m['load']:.1f}" if m.get("load") is not None else ""
    threads = f" ({m['torch_threads']} threads)" if m.get("torch_threads") else ""
    system = m.get("system") or m.get("platform", "?")
    software = [f"Python {m.get('python', '?')}", f"torch {m.get('torch')}{threads}"]
    software += [f"onnxruntime {m.get('onnxruntime')}"]
    software += [f"OpenVINO {m['openvino']}"] if m.get("openvino") else []
    return (
        f"{cpu}{flags}, {m.get('cores', m.get('cpus'))} cores{load}; {system}, "
        f"{', '.join(software)}; {m.get('date', '?')}"
    )


def results_path(folder: str | os.PathLike, name: str) -> Path:
    return Path(folder) / f"{name}.json"


def load_results(folder: str | os.PathLike, name: str) -> dict:
    """``folder/<name>.json`` as saved by ``save_results``; {} where there is none yet."""
    path = results_path(folder, name)
    return json.loads(path.read_text()) if path.is_file() else {}


def save_results(folder: str | os.PathLike, name: str, results: dict) -> Path:
    """``folder/<name>.json``, written atomically (keys in the order the benchmark made them;
    values JSON does not know, such as paths, as their text)."""
    text = json.dumps(results, indent=2, default=str) + "\n"
    return write_text_atomic(results_path(folder, name), text)


def write_section(doc: Path, begin: str, end: str, text: str, title: str = "") -> Path:
    """Replace the block of ``doc`` from the ``begin`` marker to the ``end`` marker with
    ``text`` between them, or append the block where ``doc`` has none; the rest of ``doc`` is
    kept as it is. A missing ``doc`` starts as ``title``. Atomic: a reader never sees half a
    file."""
    block = f"{begin}\n{text.strip()}\n{end}"
    old = doc.read_text() if doc.is_file() else f"{title.rstrip()}\n"
    head, found, rest = old.partition(begin)
    if found and end in rest:
        new = head + block + rest.split(end, 1)[1]
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + block + "\n"
    return write_text_atomic(doc, new)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (benchmarks draw PNGs, no window)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
