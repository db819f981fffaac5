"""int8 static QDQ quantisation (uint8 activations, int8 per-channel weights), with a check.

CNNs are quantised statically: activation ranges are calibrated on real training layers. The
same QDQ file is int8 for both runtimes: onnxruntime runs its QDQ kernels, OpenVINO folds the
Q/DQ pairs into its own int8 convolutions. Each installed runtime's int8 is then timed against
fp32 here, at ``BATCHES``, and the speed-ups go into the int8 model's metadata, from which the
loader decides where int8 scores (``inspect3d.infer.int8``).
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from inspect3d.infer.cpu import cpu_name, cpu_summary, int8_class
from inspect3d.infer.int8 import BATCHES, accuracy_loss, int8_verdict
from inspect3d.infer.metadata import INPUT_NAME, ModelMeta
from inspect3d.infer.model import open_session
from inspect3d.infer.providers import openvino_installed
from inspect3d.io import atomic_path
from inspect3d.results import RESULTS

log = logging.getLogger(__name__)


class _Layers(CalibrationDataReader):
    def __init__(self, layers: np.ndarray) -> None:
        self._it = iter(layers[i : i + 1] for i in range(len(layers)))

    def get_next(self) -> dict | None:
        batch = next(self._it, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_int8(fp32: Path, calib: np.ndarray, layers: np.ndarray, labels: np.ndarray) -> Path:
    """Write ``<name>.int8.onnx`` beside ``fp32`` and report its agreement with fp32."""
    out = fp32.with_name(fp32.stem + ".int8.onnx")
    with tempfile.TemporaryDirectory() as tmpdir, atomic_path(out) as tmp:
        pre = Path(tmpdir) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(tmp),
            _Layers(calib),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
        )
        check = compare(fp32, tmp, layers, labels)
        speed = {**measure_int8_speed(fp32, tmp, layers), "check": check}
        _copy_metadata(fp32, tmp, speed)
        RESULTS.info(speed_report(speed))
    return out


def _copy_metadata(src: Path, dst: Path, speed: dict) -> None:
    model = onnx.load(str(dst))
    props = {p.key: p.value for p in onnx.load(str(src)).metadata_props}
    props["quantization"] = "int8-qdq-static"
    props["int8_speed"] = json.dumps(speed)
    del model.metadata_props[:]
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(dst))


def compare(fp32: Path, int8: Path, layers: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy of both models on labelled layers, and how often they agree."""

    def probs(path: Path) -> np.ndarray:
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.concatenate(
            [s.run(None, {INPUT_NAME: layers[i : i + 8]})[0] for i in range(0, len(layers), 8)]
        )

    p32, p8 = probs(fp32), probs(int8)
    known = labels >= 0
    acc = {
        name: float((p.argmax(1)[known] == labels[known]).mean()) if known.any() else None
        for name, p in (("fp32", p32), ("int8", p8))
    }
    agree = float((p32.argmax(1) == p8.argmax(1)).mean())
    decisions = _same_decisions(fp32, p32, p8)
    RESULTS.info(
        f"int8 check on {len(layers)} validation layers: accuracy fp32 {acc['fp32']}, "
        f"int8 {acc['int8']}; same class {agree:.0%}; same decision at the threshold "
        f"{decisions:.0%}; max |Δ probs| {float(np.abs(p32 - p8).max()):.3f}"
    )
    return {**acc, "agreement": agree, "same_decision": decisions}


def _same_decisions(fp32: Path, p32: np.ndarray, p8: np.ndarray) -> float:
    """Share of layers both flag alike (defect score 1 - P(normal) >= the model's threshold):
    what the watcher acts on, which the class alone does not show near the threshold."""
    props = {p.key: p.value for p in onnx.load(str(fp32)).metadata_props}
    meta = ModelMeta.from_props(props, repr(str(fp32)))
    flagged = [(1 - p[:, meta.normal_index]) >= meta.threshold for p in (p32, p8)]
    return float((flagged[0] == flagged[1]).mean())


def measure_int8_speed(fp32: Path, int8: Path, layers: np.ndarray, repeats: int = 15) -> dict:
    """``int8_speed`` (see ``inspect3d.infer.int8``): fp32 / int8 time, medians of ``repeats``
    calls each, per installed CPU runtime and batch size in ``BATCHES``."""
    runtimes = {"onnxruntime": "cpu", **({"openvino": "openvino"} if openvino_installed() else {})}
    speedup = {}
    for runtime, provider in runtimes.items():
        pair = [open_session(p, provider, parity=False) for p in (fp32, int8)]
        speedup[runtime] = {
            str(b): round(_ratio(pair, np.resize(layers, (b, *layers.shape[1:])), repeats), 3)
            for b in BATCHES
        }
    return {"cpu": cpu_name(), "flags": cpu_summary(), "int8_class": int8_class(),
            "speedup": speedup}  # fmt: skip


def _ratio(pair: list, batch: np.ndarray, repeats: int, rounds: int = 3) -> float:
    """Median fp32 time / median int8 time. Each model runs blocks of calls in turn, as a
    scorer runs one model call after call (alternating single calls made onnxruntime's int8
    look 1.5x faster here than it ran in blocks), the first call of a block untimed."""
    times: list[list[float]] = [[], []]
    for _ in range(rounds):
        for session, out in zip(pair, times, strict=True):
            for i in range(repeats // rounds + 1):
                start = time.perf_counter()
                session.run(None, {INPUT_NAME: batch})
                if i:
                    out.append(time.perf_counter() - start)
    return statistics.median(times[0]) / statistics.median(times[1])


def speed_report(speed: dict) -> str:
    """What was measured, and where int8 will score on a CPU like this one."""
    lines = [f"int8 speed-up over fp32 on {speed['cpu']} ({speed['flags']}):"]
    if lost := accuracy_loss(speed):
        lines.append(f"  int8 loses {100 * lost:.1f} points of accuracy: fp32 scores everywhere")
    for runtime, ratios in speed["speedup"].items():
        pays, _ = int8_verdict(speed, runtime, speed["int8_class"])
        shown = ", ".join(f"{r:.2f}x at batch {b}" for b, r in ratios.items())
        verdict = "int8 scores" if pays else "fp32 scores (int8 slower at some batch size)"
        lines.append(f"  {runtime}: {shown} -> on CPUs like this one {verdict}")
    return "\n".join(lines)
