"""int8 static QDQ quantisation (uint8 activations, int8 per-channel weights), with a check.

CNNs are quantised statically: activation ranges are calibrated on real training layers.
"""

from __future__ import annotations

import logging
import tempfile
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

from inspect3d.infer.metadata import INPUT_NAME
from inspect3d.io import atomic_path

log = logging.getLogger(__name__)


class _Layers(CalibrationDataReader):
    def __init__(self, layers: np.ndarray) -> None:
        self._it = iter(layers[i : i + 1] for i in range(len(layers)))

    def get_next(self) -> dict | None:
        batch = next(self._it, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_int8(fp32: Path, calib: np.ndarray, layers: np.ndarray, labels: np.ndarray) -> Path:
    """Write ``<name>.int8.onnx`` beside ``fp32`` and print its agreement with fp32."""
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
        _copy_metadata(fp32, tmp)
        compare(fp32, tmp, layers, labels)
    return out


def _copy_metadata(src: Path, dst: Path) -> None:
    model = onnx.load(str(dst))
    props = {p.key: p.value for p in onnx.load(str(src)).metadata_props}
    props["quantization"] = "int8-qdq-static"
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
    print(
        f"int8 check on {len(layers)} validation layers: accuracy fp32 {acc['fp32']}, "
        f"int8 {acc['int8']}; same class {agree:.0%}; max |Δ probs| "
        f"{float(np.abs(p32 - p8).max()):.3f}"
    )
    return {**acc, "agreement": agree}
