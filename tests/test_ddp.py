"""Data-parallel training: ``torchrun`` with 2 CPU processes on gloo, on localhost only."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inspect3d.models.checkpoint import load_checkpoint, model_from_checkpoint
from inspect3d.train import distributed

from conftest import train_overrides

TIMEOUT_S = 240  # a hung rank fails the test instead of the suite


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_env() -> dict[str, str]:
    """Gloo on the loopback interface, one thread per rank (2 ranks share the CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--monitor-interval=0.2",  # notice finished ranks at once (default: every 5 s)
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "inspect3d.cli",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=local_env())


@pytest.fixture(scope="module")
def ddp_run(synth_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run = tmp_path_factory.mktemp("ddp") / "run"
    overrides = train_overrides(synth_dir, "trainer.max_steps_per_epoch=null", "trainer.epochs=2")
    r = torchrun("train", *overrides, f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    return run, r


@pytest.mark.slow
def test_both_ranks_train_on_half_the_layers_each(ddp_run):
    run, _ = ddp_run
    text = (run / "train.log").read_text()
    assert "DDP: 2 processes on cpu (backend gloo)" in text
    assert "batch 4 per process x 2 processes = effective batch 8" in text
    n_train = json.loads((run / "metrics.json").read_text())["split"]["n_train"]
    half = -(-n_train // 2)  # DistributedSampler pads the last shard
    assert text.count(f"layers per rank [{half}, {half}]") == 2  # both epochs
    assert json.loads((run / "metrics.json").read_text())["scale"]["world_size"] == 2


@pytest.mark.slow
def test_gradients_were_averaged_weights_identical_on_both_ranks(ddp_run):
    run, _ = ddp_run
    assert "DDP: weights identical on all 2 ranks" in (run / "train.log").read_text()


@pytest.mark.slow
def test_only_rank_0_writes_the_run(ddp_run):
    run, r = ddp_run
    text = (run / "train.log").read_text()
    assert text.count("epoch 2: train loss") == 1, "a second rank wrote to train.log"
    assert r.stdout.count("checkpoint: ") == 1  # the CLI's summary line: rank 0 only
    assert set(p.name for p in run.iterdir()) >= {"checkpoint.pt", "last.pt", "metrics.json"}
    assert not list(run.glob(".*.tmp"))


@pytest.mark.slow
def test_checkpoint_is_the_single_process_format(ddp_run):
    run, _ = ddp_run
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
    model = model_from_checkpoint(ckpt)  # strict load into a plain model
    with torch.inference_mode():
        logits, _ = model(torch.zeros(2, 1, 128, 128))
    assert logits.shape == (2, len(ckpt["classes"])) and torch.isfinite(logits).all()


def as_rank(monkeypatch, rank: int, gathered: list) -> None:
    """Pretend to be ``rank`` of 2 whose collectives return ``gathered`` (logic, not gloo:
    the torchrun test above covers the real process group)."""
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "gather", lambda obj: gathered)


def test_ranks_with_different_hydra_folders_use_rank_0s(tmp_path, monkeypatch):
    """Ranks started a second apart compose different timestamped folders: rank 0's wins and
    the empty one another rank's Hydra made is removed (one holding files is kept)."""
    first, other, busy = tmp_path / "t0", tmp_path / "t1", tmp_path / "t2"
    for d in (first, other, busy):
        (d / ".hydra").mkdir(parents=True)
        (d / "train.log").touch()
    (busy / "notes.txt").write_text("mine")
    as_rank(monkeypatch, 1, [str(first), str(other)])
    assert distributed.shared_out_dir(other) == first and not other.exists()
    assert distributed.shared_out_dir(busy) == first and busy.exists()
    as_rank(monkeypatch, 0, [str(first), str(other)])
    assert distributed.shared_out_dir(first) == first and first.exists()


def test_ranks_with_different_weights_fail_loudly(monkeypatch):
    model = torch.nn.Linear(3, 2)
    digest = distributed.weights_digest(model)
    as_rank(monkeypatch, 0, [digest, digest])
    distributed.check_in_sync(model)
    as_rank(monkeypatch, 0, [digest, "0" * 64])
    with pytest.raises(RuntimeError, match="different weights"):
        distributed.check_in_sync(model)


def test_single_process_uses_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed.process_group("cpu", timeout_s=5) as device:
        assert device.type == "cpu" and distributed.world_size() == 1
        assert distributed.is_main() and distributed.broadcast("x") == "x"
