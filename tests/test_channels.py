"""Grey layers or colour photos: detected for data=folder, logged, and checked at eval."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
from omegaconf import OmegaConf

from inspect3d.data.preprocess import detect_channels
from inspect3d.data.sources import preprocess_of
from inspect3d.errors import InspectError

from conftest import compose, train_overrides
from isolate import isolated

GAINS = (1.0, 0.75, 0.45)  # a warm white balance: the channels differ


def tinted_copy(src, dst):
    """``src`` (folder per class, grey PNGs) as colour PNGs under ``dst``."""
    for path in sorted(p for p in src.rglob("*.png") if p.relative_to(src).parts[0][0] != "_"):
        out = dst / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).astype(np.float32)
        bgr = np.stack([grey * g for g in GAINS[::-1]], -1).clip(0, 255).astype(np.uint8)
        cv2.imwrite(str(out), bgr)
    return dst


def test_grey_files_and_colour_photos_are_told_apart(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (40, 40), dtype=np.uint8)
    paths = {"grey.png": grey, "grey_as_rgb.jpg": np.stack([grey] * 3, -1)}
    paths["colour.png"] = np.stack([grey, grey // 2, 255 - grey], -1)
    for name, image in paths.items():
        cv2.imwrite(str(tmp_path / name), image)
    assert detect_channels([tmp_path / "grey.png", tmp_path / "grey_as_rgb.jpg"])[0] == 1
    assert detect_channels([tmp_path / "colour.png"] * 3 + [tmp_path / "grey.png"]) == (3, 3, 4)


def test_folder_of_colour_photos_trains_in_colour_unless_told(synth_dir, tmp_path, caplog):
    colour = tinted_copy(synth_dir, tmp_path / "colour")
    cfg = compose("train", ["data=folder", f"data.root={colour}", "data.normal_class=ok"])
    assert cfg.data.channels is None
    with caplog.at_level(logging.INFO, logger="inspect3d.data.sources"):
        assert preprocess_of(cfg.data).channels == 3
    assert "are colour, so the model sees colour (data.channels=3" in caplog.text
    told = OmegaConf.merge(cfg, {"data": {"channels": 1}})
    assert preprocess_of(told.data).channels == 1
    grey = compose("train", ["data=folder", f"data.root={synth_dir}", "data.normal_class=ok"])
    assert preprocess_of(grey.data).channels == 1


def test_a_colour_run_records_colour_input(synth_dir, tmp_path):
    from inspect3d.models.checkpoint import load_checkpoint
    from inspect3d.train.run import train

    colour = tinted_copy(synth_dir, tmp_path / "colour")
    overrides = [o.replace(str(synth_dir), str(colour)) for o in train_overrides(synth_dir)]
    isolated(train, compose("train", [*overrides, "trainer.epochs=1"]), tmp_path / "run")
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["preprocess"]["channels"] == 3


def test_grey_model_given_colour_layers_is_an_error(tiny_run, holdout_dir, tmp_path):
    from inspect3d.train.evaluate import evaluate_run

    colour = tinted_copy(holdout_dir, tmp_path / "colour")
    base = [f"run={tiny_run}", "data=folder", f"data.root={colour}", "data.normal_class=ok"]
    cfg = compose("eval", [*base, f"out={tmp_path / 'e.json'}"])
    with pytest.raises(InspectError, match=r"trained on grey layers.*holds colour layers"):
        isolated(evaluate_run, cfg)
    with pytest.raises(InspectError, match=r"data.channels=3 but the model takes 1-channel"):
        isolated(evaluate_run, compose("eval", [*base, "data.channels=3", f"out={tmp_path}/f"]))
    forced = compose("eval", [*base, "data.channels=1", f"out={tmp_path / 'g.json'}"])
    assert isolated(evaluate_run, forced)["n"] > 0  # converted to grey, as asked


def test_export_parity_layers_of_the_other_kind_are_an_error(tiny_run, holdout_dir, tmp_path):
    from inspect3d.export.onnx import export_run

    colour = tinted_copy(holdout_dir, tmp_path / "colour")
    out = tmp_path / "m.onnx"
    cfg = compose("export", [f"run={tiny_run}", f"layers={colour}", f"out={out}"])
    with pytest.raises(InspectError, match=r"trained on grey layers.*layers=.*holds colour"):
        isolated(export_run, cfg)
    assert not out.exists()  # refused before anything is written
