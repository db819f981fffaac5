"""Shared fixtures: a small synthetic data set, a tiny trained run and its ONNX export.

Everything is CPU-only and small (128 px layers, a few optimiser steps) so the suite stays fast.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from isolate import isolated
from pgcluster import pg_cluster, pg_url  # noqa: F401 (PostgreSQL fixtures)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
SIZE = 128


def compose(config: str, overrides: list[str]):
    from inspect3d.config import compose as compose_config

    return compose_config(config, overrides)


def folder_overrides(root: Path) -> list[str]:
    """The synthetic folder ``root`` as ``data``, at the tests' layer size (train, fit-normal)."""
    return [
        "data=folder",
        f"data.root={root}",
        "data.normal_class=ok",
        f"data.height={SIZE}",
        f"data.width={SIZE}",
    ]


def train_overrides(root: Path, *extra: str) -> list[str]:
    return [
        *folder_overrides(root),
        "trainer=fast",
        "trainer.epochs=2",
        "model.width=8",
        *extra,
    ]


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from inspect3d.data.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth") / "set"
    generate(out, SynthConfig(seed=0, n_jobs=10, layers_per_job=6, size=SIZE), progress=False)
    return out


@pytest.fixture(scope="session")
def holdout_dir(tmp_path_factory) -> Path:
    from inspect3d.data.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("holdout") / "set"
    generate(out, SynthConfig(seed=1, n_jobs=5, layers_per_job=4, size=SIZE), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_run(synth_dir, tmp_path_factory) -> Path:
    from inspect3d.train.run import train

    run = tmp_path_factory.mktemp("run")
    isolated(train, compose("train", train_overrides(synth_dir)), run)
    return run


@pytest.fixture(scope="session")
def exported(tiny_run) -> Path:
    from inspect3d.export.onnx import export_run

    isolated(export_run, compose("export", [f"run={tiny_run}"]))
    return tiny_run / "model.onnx"


@pytest.fixture(scope="session")
def replayed(synth_dir, exported, tmp_path_factory) -> Path:
    """A watcher state folder filled by replaying synthetic jobs (review_fixtures); read-only."""
    from review_fixtures import replayed_once

    return replayed_once(synth_dir, exported, tmp_path_factory)


@pytest.fixture
def state(replayed, tmp_path) -> Path:
    """A test's own copy of the replayed state folder (QA decisions may be written to it)."""
    from review_fixtures import copy_state

    return copy_state(replayed, tmp_path / "state")


def pblm_or_skip() -> Path:
    pblm = SHARED / "pblm"
    if not pblm.is_dir():
        pytest.skip(f"real data not here: {pblm} is absent (it sits beside the project in CI)")
    return pblm


def pytest_sessionfinish(session, exitstatus):
    from isolate import shutdown

    shutdown()


@pytest.fixture
def watcher(tmp_path, exported):
    """``watcher(**settings)`` starts a Watcher on ``exported`` in ``tmp_path``; all are closed
    at the end of the test."""
    from test_watch import make_cfg

    from inspect3d.watch.service import Watcher

    made = []

    def start(**kw):
        w = Watcher(make_cfg(tmp_path, exported, **kw)).start()
        made.append(w)
        return w

    yield start
    for w in made:
        if w._locks:
            w.close()
