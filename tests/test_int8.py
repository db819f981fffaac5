"""int8 that pays or is not used: CPU int8 classes, the measured speed-ups in the model, and the
loader's choice between an int8 model and the fp32 model beside it."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import onnx
import pytest

from inspect3d.infer import cpu
from inspect3d.infer.int8 import BATCHES, int8_verdict
from inspect3d.infer.model import OnnxModel


def test_int8_class_is_read_from_the_cpu_flags(tmp_path):
    def flags(line: str) -> frozenset[str]:
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {line}\n")
        cpu.cpu_flags.cache_clear()
        return cpu.cpu_flags(str(tmp_path / "cpuinfo"))

    assert cpu.int8_class(flags("fpu sse avx avx2 fma")) == "none"
    assert cpu.int8_class(flags("avx2 avx512f avx512_vnni")) == "vnni"
    assert cpu.int8_class(flags("avx2 avx_vnni")) == "vnni"
    assert cpu.int8_class(flags("avx512_vnni amx_tile amx_int8")) == "amx"
    assert cpu.cpu_summary(flags("avx2 fma avx512_vnni")) == "avx2 fma avx512_vnni"
    cpu.cpu_flags.cache_clear()
    assert cpu.cpu_flags(str(tmp_path / "absent")) == frozenset()


SPEED = {
    "cpu": "X",
    "flags": "avx2",
    "int8_class": "none",
    "speedup": {"onnxruntime": {"1": 1.7, "8": 0.93}, "openvino": {"1": 1.2, "8": 1.6}},
}


@pytest.mark.parametrize(
    ("runtime", "cpu_class", "pays", "why"),
    [
        ("onnxruntime", "none", False, "0.93x at batch 8"),  # slower at one batch size: no
        ("openvino", "none", True, "1.60x at batch 8"),  # faster at every batch size
        ("onnxruntime", "vnni", True, "VNNI int8 instructions"),  # measured elsewhere
        ("openvino", "amx", True, "AMX"),
    ],
)
def test_int8_scores_only_where_measured_faster_at_every_batch(runtime, cpu_class, pays, why):
    got, reason = int8_verdict(SPEED, runtime, cpu_class)
    assert got is pays and why in reason
    assert int8_verdict({}, runtime, "none")[0] is False  # not measured, no VNNI/AMX


def test_int8_that_loses_more_than_a_point_of_accuracy_is_never_used():
    worse = {**SPEED, "check": {"fp32": 0.90, "int8": 0.88}}
    for cpu_class in ("none", "vnni", "amx"):
        pays, why = int8_verdict(worse, "openvino", cpu_class)
        assert pays is False and "2.0 points less accurate" in why
    close = {**SPEED, "check": {"fp32": 0.90, "int8": 0.895}}  # half a point: speed decides
    assert int8_verdict(close, "openvino", "none")[0] is True


def _set_speed(path, speed: dict) -> None:
    model = onnx.load(str(path))
    for prop in model.metadata_props:
        if prop.key == "int8_speed":
            prop.value = json.dumps(speed)
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def int8_pair(exported, synth_dir, tmp_path_factory):
    from inspect3d.export.quantize import quantize_int8

    fp32 = tmp_path_factory.mktemp("int8") / "model.onnx"
    shutil.copyfile(exported, fp32)
    model = OnnxModel.load(fp32, provider="cpu")
    layers = np.stack([model.pre.load(p) for p in sorted(synth_dir.rglob("*.png"))[:16]])
    labels = np.full(len(layers), -1)
    return fp32, quantize_int8(fp32, layers[:8], layers, labels)


def test_export_measures_int8_per_runtime_and_the_loader_follows(int8_pair, caplog):
    fp32, int8 = int8_pair
    props = {p.key: p.value for p in onnx.load(str(int8)).metadata_props}
    speed = json.loads(props["int8_speed"])  # read as written: the loader may pick fp32 here
    assert speed["int8_class"] == cpu.int8_class() and speed["flags"] == cpu.cpu_summary()
    assert "onnxruntime" in speed["speedup"]
    for ratios in speed["speedup"].values():
        assert set(ratios) == {str(b) for b in BATCHES}
        assert all(np.isfinite(r) and r > 0 for r in ratios.values())

    here = cpu.int8_class()
    slower = {**SPEED, "int8_class": here, "speedup": {"onnxruntime": {"1": 2.0, "8": 0.9}}}
    _set_speed(int8, slower)
    with caplog.at_level(logging.WARNING, logger="inspect3d"):
        model = OnnxModel.load(int8, provider="cpu")
    assert model.path == str(fp32) and model.meta.quantization == "none"
    assert "int8 not used" in caplog.text and "0.90x at batch 8" in caplog.text

    _set_speed(int8, {**slower, "speedup": {"onnxruntime": {"1": 2.0, "8": 1.1}}})
    model = OnnxModel.load(int8, provider="cpu")
    assert model.path == str(int8) and model.meta.quantization == "int8-qdq-static"


def test_int8_without_its_fp32_model_scores_with_a_warning(int8_pair, tmp_path, caplog):
    _, int8 = int8_pair
    alone = tmp_path / "model.int8.onnx"
    shutil.copyfile(int8, alone)
    _set_speed(alone, {**SPEED, "int8_class": cpu.int8_class()})
    with caplog.at_level(logging.WARNING, logger="inspect3d"):
        model = OnnxModel.load(alone, provider="cpu")
    assert model.path == str(alone) and "no fp32 model beside it" in caplog.text


def test_openvino_runs_the_same_int8_file_and_checks_the_class(int8_pair, synth_dir):
    pytest.importorskip("openvino")
    _, int8 = int8_pair
    _set_speed(int8, {**SPEED, "int8_class": cpu.int8_class()})  # OpenVINO's int8 pays here
    model = OnnxModel.load(int8, provider="openvino")
    assert model.path == str(int8) and model.runtime.startswith("OpenVINO")
    paths = sorted(synth_dir.rglob("*.png"))[:4]
    got, want = model.predict_batch(paths), OnnxModel.load(int8, provider="cpu")
    parity = model.session.parity
    assert parity.quantized and parity.ok and "same class on every layer" in str(parity)
    assert want.path != str(int8)  # onnxruntime's int8 is slower at batch 8 in SPEED: fp32
    assert [g.label for g in got] == [s.label for s in want.predict_batch(paths)]
