"""Hydra launchers: a local parallel sweep (joblib) and the SLURM config (composed, not run)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from inspect3d.config import CONFIG_DIR
from inspect3d.train import distributed

from conftest import train_overrides


def hydra_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True).hydra


@pytest.mark.slow
def test_joblib_sweep_runs_jobs_in_parallel_without_oversubscribing(synth_dir, tmp_path):
    sweep = tmp_path / "sweep"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "inspect3d.cli",
            "train",
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "optim.lr=1e-3,3e-3",
            *train_overrides(synth_dir, "trainer.epochs=1"),
            f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for job, lr in (("0", "0.001"), ("1", "0.003")):
        assert (sweep / job / "checkpoint.pt").is_file()
        assert f"optim.lr={lr}" in (sweep / job / ".hydra" / "overrides.yaml").read_text()
        threads = re.search(r"torch uses (\d+) CPU thread", (sweep / job / "train.log").read_text())
        assert int(threads.group(1)) <= max(1, (os.cpu_count() or 1) // 2)


def test_local_preset_is_joblib_with_two_jobs():
    launcher = hydra_config("hydra/launcher=local").launcher
    assert launcher._target_.endswith("JoblibLauncher") and launcher.n_jobs == 2


def test_slurm_config_composes_and_instantiates_without_submitting():
    from hydra.utils import instantiate

    launcher = hydra_config(
        "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4"
    ).launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 4
    assert launcher.timeout_min > 0 and launcher.tasks_per_node == 1
    assert type(instantiate(launcher)).__name__ == "SlurmLauncher"  # nothing is submitted


@pytest.fixture
def clean_dist_env(monkeypatch):
    """Let the test's exports vanish afterwards (setenv records them; delenv drops them)."""
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT"):  # fmt: skip
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)


def test_a_slurm_task_joins_ddp_like_a_torchrun_rank(monkeypatch, clean_dist_env):
    """hydra/launcher=slurm with tasks_per_node=2: submitit's environment becomes torchrun's."""
    slurm = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "42",
        "SLURM_NTASKS": "2",
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "0",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_NODELIST": "gpu07",
    }
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    assert distributed.env_ranks() == (2, 1, 1)
    assert os.environ["MASTER_ADDR"] == "gpu07" and int(os.environ["MASTER_PORT"]) > 0


@pytest.mark.slow
def test_submitit_job_with_two_tasks_trains_with_ddp(synth_dir, tmp_path):
    """The SLURM path end to end, locally: submitit_local runs one job as 2 tasks (what
    hydra/launcher=slurm does with tasks_per_node=2); they must join one DDP run."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # localhost only
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "inspect3d.cli",
            "train",
            "-m",
            "hydra/launcher=submitit_local",
            "hydra.launcher.tasks_per_node=2",
            "hydra.launcher.timeout_min=5",
            *train_overrides(synth_dir, "trainer.epochs=1", "trainer.max_steps_per_epoch=null"),
            f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    log = (sweep / "0" / "train.log").read_text()
    assert "DDP: 2 processes on cpu (backend gloo)" in log
    assert "DDP: weights identical on all 2 ranks" in log
    assert (sweep / "0" / "checkpoint.pt").is_file()
