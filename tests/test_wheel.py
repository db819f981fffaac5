"""The operator's install: a wheel, installed without ``-e`` into a fresh venv without torch.

One venv for the module (built once, ~15 s). Every command runs from a folder outside the repo,
with no PYTHONPATH, so it can only use what the wheel installed (configs, templates included).
The ONNX model comes from the dev venv (the session fixture ``exported``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SIZE

pytestmark = pytest.mark.slow


class LightEnv:
    """A venv holding the built wheel and its base dependencies; runs commands in ``cwd``."""

    def __init__(self, venv: Path, cwd: Path) -> None:
        self.bin, self.cwd = venv / "bin", cwd
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        self.env["PATH"] = f"{self.bin}{os.pathsep}{self.env.get('PATH', '')}"

    def run(self, *args: str, rc: int = 0) -> subprocess.CompletedProcess:
        """``inspect3d ARGS`` (``python ARGS`` when args[0] is 'python'); checks the exit code."""
        exe = [str(self.bin / "python")] if args[0] == "python" else [str(self.bin / "inspect3d")]
        r = subprocess.run(
            [*exe, *args[1:]] if args[0] == "python" else [*exe, *args],
            capture_output=True, text=True, cwd=self.cwd, env=self.env, timeout=300,
        )  # fmt: skip
        assert r.returncode == rc, (
            f"`{' '.join(args)}` exited {r.returncode}, expected {rc}\n"
            f"--- stderr:\n{r.stderr}\n--- stdout:\n{r.stdout}"
        )
        return r


def _check(cmd: list[str], what: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{what} failed:\n{r.stderr}\n{r.stdout}"


def build_wheel(out: Path) -> Path:
    """Build from a copy of the sources, so the shared working tree gets no build/ folder."""
    src = out / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "inspect3d", src / "inspect3d", ignore=shutil.ignore_patterns("__pycache__")
    )
    pip = [sys.executable, "-m", "pip"]
    _check([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
           "building the wheel")  # fmt: skip
    (wheel,) = out.glob("inspect3d-*.whl")
    return wheel


@pytest.fixture(scope="module")
def light(tmp_path_factory) -> LightEnv:
    root = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(root)
    venv = root / "venv"
    _check([sys.executable, "-m", "venv", "--without-pip", str(venv)], "creating the venv")
    # the dev venv's pip installs into the light venv (no ensurepip: a few seconds less)
    _check([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
            "-q", str(wheel)], "installing the wheel")  # fmt: skip
    work = root / "work"  # outside the repo
    work.mkdir()
    return LightEnv(venv, work)


def test_the_light_install_has_no_torch_and_is_not_the_repo(light):
    code = (
        "import importlib.util, inspect3d; "
        "print(inspect3d.__file__); "
        "print([m for m in ('torch', 'torchvision') if importlib.util.find_spec(m)])"
    )
    where, found = light.run("python", "-c", code).stdout.splitlines()
    assert Path(where).is_relative_to(light.bin.parent) and found == "[]"
    version = light.run("--version").stdout.strip()
    assert version == light.run("python", "-m", "inspect3d", "--version").stdout.strip()
    assert version.startswith("inspect3d ") and version != "inspect3d 0+unknown"


def test_operator_flow_from_a_folder_outside_the_repo(light, exported):
    r = light.run("synth", "out=data", "seed=5", "n_jobs=4", "layers_per_job=3", f"size={SIZE}")
    assert "wrote 12 layers" in r.stdout
    r = light.run("predict", str(exported), "data/[!_]*/*.png", "--jsonl")  # classes, not _masks
    rows = [json.loads(line) for line in r.stdout.splitlines()]  # stdout: JSON lines only
    assert len(rows) == 12 and all("defect_score" in row for row in rows), r.stdout

    light.run("simulate", "data=data", "inbox=inbox", "printers=2", "rate=0")
    r = light.run("watch", f"model={exported}", "inbox=inbox", "state=state",
                  "until_idle=true", "settle_s=0")  # fmt: skip
    status = json.loads(light.run("status", "state=state", "--json").stdout)
    assert status["jobs"] == 4 and status["layers_scored"] == 12, status
    light.run("report", "state=state", "out=report")
    assert (light.cwd / "report" / "index.html").is_file()
    assert "state=" in light.run("review", "--help").stdout


@pytest.mark.parametrize("command", ["train", "eval", "export", "fit-normal"])
def test_training_commands_name_the_extra(light, command):
    r = light.run(command, "run=x", rc=2)
    assert r.stderr.strip().splitlines() == [
        f'error: inspect3d {command} needs the training extra: pip install "inspect3d[train]"'
    ]
    assert r.stdout == ""
