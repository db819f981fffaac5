"""OpenVINO behind the few onnxruntime session calls ``OnnxModel`` makes, on the same .onnx file.

OpenVINO reads ONNX directly (``Core.read_model``), metadata included, so an exported model needs
no conversion step. The package is imported here only, and only when OpenVINO was chosen (see
``providers.choose_runtime``): a scoring PC without the extra never loads it.

Parity: the first real batch a session scores is scored by onnxruntime's CPU provider too; the
largest difference and the tolerance are logged, and past the tolerance every call raises (no
layer gets a score the exported model would not give), unless the session was opened by
``provider=auto``: then it logs the error and scores with the reference (onnxruntime) from there
on. The reference session is otherwise dropped.
An int8 (QDQ) model is rounded differently by the two runtimes' int8 kernels (differences of a
few quantisation steps are normal), so there the check asks for the same class on every layer
and logs the differences.

Precision: OpenVINO computes in bfloat16 by default on CPUs that have it (AVX512_BF16, AMX:
Zen 4, Sapphire Rapids); measured on the demo's model, that moves defect maps by up to 0.47 and
probabilities by 6e-3. Sessions here ask for float32 (``INFERENCE_PRECISION_HINT``), the
precision the model was exported and checked in.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from inspect3d.errors import InspectError

log = logging.getLogger(__name__)

# |OpenVINO - onnxruntime| <= ATOL + RTOL * |onnxruntime|, for probabilities and maps alike (the
# normal-only maps are in units of the threshold, unbounded above: hence the relative part)
ATOL, RTOL = 1e-4, 1e-3


@dataclass(frozen=True)
class _Port:
    name: str
    shape: list


@dataclass(frozen=True)
class _Meta:
    custom_metadata_map: dict[str, str]


@dataclass
class Parity:
    """The check of the first real batch against onnxruntime."""

    layers: int
    max_abs: float  # largest |OpenVINO - onnxruntime| over all outputs
    worst_ratio: float  # largest |diff| / (ATOL + RTOL * |ref|): <= 1 passes
    same_class: bool  # the arg-max class agrees on every layer
    quantized: bool = False  # int8: the class must agree, the differences are logged

    @property
    def ok(self) -> bool:
        return self.same_class if self.quantized else self.worst_ratio <= 1.0

    def __str__(self) -> str:
        head = f"OpenVINO vs onnxruntime on the first {self.layers} real layer(s): max |diff| "
        if self.quantized:
            verdict = "the same class on every layer" if self.ok else "a DIFFERENT class"
            return f"{head}{self.max_abs:.2e} (int8 model: runtimes round differently), {verdict}"
        verdict = "within" if self.ok else "OUTSIDE"
        return f"{head}{self.max_abs:.2e}, {verdict} the tolerance {ATOL:g} + {RTOL:g} x |value|"


class OpenVinoSession:
    """A compiled OpenVINO model answering ``run``, ``get_inputs``, ``get_outputs``,
    ``get_providers`` and ``get_modelmeta`` like an ``onnxruntime.InferenceSession``."""

    def __init__(
        self,
        path: str,
        threads: int = 0,
        reference: Callable | None = None,
        fallback: bool = False,
    ) -> None:
        import openvino as ov  # the extra: imported only when OpenVINO scores

        core = ov.Core()
        try:
            model = core.read_model(path)
        except Exception as exc:  # OpenVINO's own error types
            raise InspectError(f"OpenVINO cannot load {path!r}: {exc}") from exc
        self._meta = _Meta(_metadata(model))
        self._inputs = [_Port(p.get_any_name(), _shape(p)) for p in model.inputs]
        self._outputs = [_Port(p.get_any_name(), _shape(p)) for p in model.outputs]
        # one stream at low latency: the watcher and predict send one batch at a time. No CPU
        # pinning: the decode threads run beside inference (and a shop PC does other work);
        # pinned threads then wait for their core (measured here: 1.2-1.4x slower under load)
        config = {
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False,
            "INFERENCE_PRECISION_HINT": "f32",  # not bf16 where the CPU has it (module doc)
        }
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = threads
        self._compiled = core.compile_model(model, "CPU", config)
        self._request = self._compiled.create_infer_request()
        self._lock = threading.Lock()  # an infer request serves one call at a time
        self.version = ov.__version__.split("-")[0]
        self._reference = reference
        self._fallback = fallback  # on a failed parity check: score with the reference instead
        self._instead = None  # that reference session, once it scores
        self.quantized = self._meta.custom_metadata_map.get("quantization", "none") != "none"
        self.parity: Parity | None = None

    def get_inputs(self) -> list[_Port]:
        return self._inputs

    def get_outputs(self) -> list[_Port]:
        return self._outputs

    @property
    def precision(self) -> str:
        """The precision OpenVINO computes in, e.g. "f32"."""
        return self._compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()

    def get_providers(self) -> list[str]:
        if self._instead is not None:
            return self._instead.get_providers()
        return [f"OpenVINO {self.version} CPU"]

    def get_modelmeta(self) -> _Meta:
        return self._meta

    def run(self, _names: object, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self._instead is not None:
            return self._instead.run(None, feeds)
        if self.parity is not None and not self.parity.ok:
            raise InspectError(f"{self.parity}: not scoring with it; use provider=cpu")
        with self._lock:
            result = self._request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
            outputs = [np.array(result[port]) for port in self._compiled.outputs]
            reference, self._reference = self._reference, None  # the first batch only
        if reference is not None:
            return self._check(feeds, outputs, reference())
        return outputs

    def _check(self, feeds: dict, outputs: list[np.ndarray], session) -> list[np.ndarray]:
        expected = session.run(None, feeds)
        self.parity = compare_outputs(outputs, expected, self.quantized)
        if self.parity.ok:
            log.info("%s", self.parity)
            return outputs
        if self._fallback:
            log.error("%s: scoring with onnxruntime's CPU provider instead", self.parity)
            self._instead = session
            return expected
        log.error("%s", self.parity)
        raise InspectError(f"{self.parity}: not scoring with it; use provider=cpu")


def compare_outputs(
    got: list[np.ndarray], expected: list[np.ndarray], quantized: bool = False
) -> Parity:
    """How far ``got`` is from ``expected`` (probs, maps), against ATOL/RTOL."""
    max_abs = worst = 0.0
    for a, b in zip(got, expected, strict=True):
        diff = np.abs(a.astype(np.float64) - b)
        max_abs = max(max_abs, float(diff.max(initial=0.0)))
        worst = max(worst, float((diff / (ATOL + RTOL * np.abs(b))).max(initial=0.0)))
    same = bool((got[0].argmax(1) == expected[0].argmax(1)).all())
    return Parity(len(got[0]), max_abs, worst, same, quantized)


def _metadata(model) -> dict[str, str]:
    """The ONNX ``metadata_props``, which OpenVINO keeps in the model's "framework" rt_info."""
    info = model.get_rt_info()  # an RTMap: indexable, but without ``get``
    framework = info["framework"] if "framework" in info else {}  # noqa: SIM401
    return {k: v.astype(str) for k, v in framework.items()}


def _shape(port) -> list:
    return [d.get_length() if d.is_static else "?" for d in port.get_partial_shape()]
