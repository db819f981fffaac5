"""OpenVINO as a second runtime on the same model.onnx: choice, parity, decisions, the watcher.

Tests that run OpenVINO skip where the package is absent; the ``dev`` extra installs it, so CI
runs them.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from test_watch import db, drain, layer_images, put

from inspect3d.errors import InspectError
from inspect3d.infer import providers
from inspect3d.infer.metadata import INPUT_NAME
from inspect3d.infer.model import OnnxModel
from inspect3d.watch.status import summary


def test_missing_openvino_is_one_clear_error_naming_the_extra(exported, monkeypatch):
    monkeypatch.setattr(providers, "openvino_installed", lambda: False)
    with pytest.raises(InspectError) as err:
        OnnxModel.load(exported, provider="openvino")
    msg = str(err.value)
    assert 'pip install "inspect3d[openvino]"' in msg
    assert "available here: auto, cpu" in msg and "openvino" not in msg.split("available here")[1]
    assert providers.choose_runtime("auto") == "onnxruntime"  # auto never asks for it then


def test_auto_takes_openvino_on_x86_when_installed_and_onnxruntime_elsewhere(monkeypatch):
    monkeypatch.setattr(providers, "openvino_installed", lambda: True)
    monkeypatch.setattr(providers, "is_x86", lambda: True)
    assert providers.choose_runtime("auto") == "openvino"
    assert providers.choose_runtime("cpu") == "onnxruntime"
    monkeypatch.setattr(providers, "is_x86", lambda: False)  # e.g. an ARM shop-floor PC
    assert providers.choose_runtime("auto") == "onnxruntime"
    assert "openvino" in providers.available_choices()


def test_openvino_gives_the_same_scores_and_decisions_and_logs_its_parity(
    exported, synth_dir, caplog
):
    pytest.importorskip("openvino")
    paths = sorted(synth_dir.rglob("*.png"))[:10]
    cpu = OnnxModel.load(exported, provider="cpu")
    with caplog.at_level("INFO", logger="inspect3d"):
        ov = OnnxModel.load(exported, provider="openvino")
        got = [s for _, s in ov.predict_files(paths, batch_size=4)]
    assert ov.runtime.startswith("OpenVINO") and cpu.runtime == "onnxruntime CPUExecutionProvider"
    assert ov.meta == cpu.meta  # the metadata read by OpenVINO from the same file
    assert ov.session.parity is not None and ov.session.parity.ok
    assert ov.session.parity.layers == 4  # the first real batch
    assert "within the tolerance 0.0001 + 0.001 x |value|" in caplog.text
    want = cpu.predict_batch(paths)
    assert [s.decision for s in got] == [s.decision for s in want]
    assert [s.label for s in got] == [s.label for s in want]
    np.testing.assert_allclose([s.defect_score for s in got], [s.defect_score for s in want],
                               atol=1e-4)  # fmt: skip
    np.testing.assert_allclose(got[0].defect_map, want[0].defect_map, atol=1e-4)


class _Shifted:
    """A reference 'onnxruntime' whose outputs are off by 0.01: the parity check must fail."""

    def __init__(self, path):
        self.real = OnnxModel.load(path, provider="cpu").session

    def run(self, names, feeds):
        return [x + 0.01 for x in self.real.run(names, feeds)]

    def get_providers(self):
        return self.real.get_providers()


def test_parity_outside_the_tolerance_refuses_to_score(exported, synth_dir):
    pytest.importorskip("openvino")
    from inspect3d.infer.openvino import OpenVinoSession

    session = OpenVinoSession(str(exported), reference=lambda: _Shifted(exported))
    model = OnnxModel(session, OnnxModel.load(exported, provider="cpu").meta, str(exported))
    layer = sorted(synth_dir.rglob("*.png"))[0]
    for _ in range(2):  # the first call checks; every later one is refused as well
        with pytest.raises(InspectError, match="OUTSIDE the tolerance.*use provider=cpu"):
            model.predict(layer)


def test_auto_falls_back_to_onnxruntime_when_the_parity_check_fails(exported, synth_dir, caplog):
    pytest.importorskip("openvino")
    from inspect3d.infer.openvino import OpenVinoSession

    reference = _Shifted(exported)
    session = OpenVinoSession(str(exported), reference=lambda: reference, fallback=True)
    model = OnnxModel(session, OnnxModel.load(exported, provider="cpu").meta, str(exported))
    layers = sorted(synth_dir.rglob("*.png"))[:2]
    with caplog.at_level("ERROR", logger="inspect3d"):
        _, second = (model.predict(p) for p in layers)  # scored, not refused
    assert "OUTSIDE the tolerance" in caplog.text
    assert "onnxruntime's CPU provider instead" in caplog.text
    assert model.runtime == "onnxruntime CPUExecutionProvider"  # status shows what scores
    probs, _ = reference.run(None, {INPUT_NAME: model.pre.load(layers[1])[None]})
    assert list(second.probs.values()) == pytest.approx(probs[0].tolist(), abs=1e-6)


def test_openvino_computes_in_float32_even_where_the_cpu_has_bfloat16(exported, synth_dir):
    pytest.importorskip("openvino")
    model = OnnxModel.load(exported, provider="openvino")
    assert model.session.precision == "f32"  # OpenVINO's default there is bf16
    layers = sorted(synth_dir.rglob("*.png"))[:4]
    got = model.predict_batch(layers)
    want = OnnxModel.load(exported, provider="cpu").predict_batch(layers)
    np.testing.assert_allclose(got[0].defect_map, want[0].defect_map, atol=1e-5)


def test_watcher_scores_with_openvino_and_status_says_so(watcher, synth_dir, tmp_path):
    pytest.importorskip("openvino")
    w = watcher(provider="openvino")
    imgs = layer_images(synth_dir, 3)
    big = tmp_path / "big.jpg"  # 4x the model size: decoded at 1/4 scale by libjpeg
    cv2.imwrite(str(big), cv2.resize(cv2.imread(str(imgs[0]), 0), None, fx=4, fy=4))
    imgs.append(big)
    for i, src in enumerate(imgs):
        put(w.cfg, "p1", "j", f"layer_{i:04d}{src.suffix}", src)
    drain(w)
    s = summary(w.state)
    assert s["layers_scored"] == 4 and s["health"]["provider"].startswith("OpenVINO")
    assert w.model.session.parity.ok
    bare = OnnxModel.load(w.cfg.model, provider="cpu").predict_batch(imgs)
    rows = db(w.cfg).execute("SELECT score FROM layers ORDER BY layer").fetchall()
    np.testing.assert_allclose([r["score"] for r in rows], [b.defect_score for b in bare],
                               atol=1e-4)  # fmt: skip


def test_predict_says_which_runtime_scored_and_its_parity(exported, synth_dir, capsys):
    pytest.importorskip("openvino")
    from inspect3d.infer.cli import main

    paths = [str(p) for p in sorted(synth_dir.rglob("*.png"))[:3]]
    assert main([str(exported), *paths, "--provider", "openvino", "--jsonl"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 3
    assert "scored with OpenVINO" in err and "within the tolerance" in err
    assert main([str(exported), *paths, "--provider", "cpu"]) == 0
    assert "scored with onnxruntime CPUExecutionProvider" in capsys.readouterr().err
