"""Choosing the runtime and its providers: GPU when present, never a silent CPU fallback.

Two runtimes score the same ``model.onnx``: onnxruntime (always installed; CPU, CUDA, TensorRT)
and OpenVINO (the ``inspect3d[openvino]`` extra; faster on x86 CPUs). ``auto`` takes a GPU
provider of onnxruntime when one is installed, else OpenVINO on an x86 CPU when installed, else
onnxruntime's CPU provider.
"""

from __future__ import annotations

import importlib.util
import os

import onnxruntime as ort

from inspect3d.errors import InspectError
from inspect3d.infer.cpu import is_x86

ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
OPENVINO = "openvino"
OPENVINO_EXTRA = 'pip install "inspect3d[openvino]"'
PROVIDER_CHOICES = ("auto", *ALIASES, OPENVINO)
GPU_PROVIDERS = (ALIASES["tensorrt"], ALIASES["cuda"])
# TensorRT builds fp16 engines (about 2x on tensor cores; the model's outputs are probabilities
# and a coarse map, well within fp16) and caches them, so only the first start pays the build.
TENSORRT_OPTIONS = {
    "trt_fp16_enable": True,
    "trt_engine_cache_enable": True,
    "trt_engine_cache_path": os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "inspect3d", "trt"
    ),
}


def openvino_installed() -> bool:
    """Whether the openvino package can be imported (looked up, not imported: it is large)."""
    return importlib.util.find_spec("openvino") is not None


def choose_runtime(requested: str = "auto") -> str:
    """The runtime, "onnxruntime" or "openvino", for a provider choice (``auto``: module doc)."""
    check_available(requested)
    if requested == OPENVINO:
        return OPENVINO
    if requested != "auto":
        return "onnxruntime"
    gpu = set(GPU_PROVIDERS) & set(ort.get_available_providers())
    return OPENVINO if not gpu and is_x86() and openvino_installed() else "onnxruntime"


def resolve_providers(requested: str = "auto") -> list:
    """onnxruntime's provider list for a session. ``auto``: TensorRT, CUDA if installed, then
    CPU."""
    available = ort.get_available_providers()
    if requested == "auto":
        gpu = [p for p in GPU_PROVIDERS if p in available]
        return [_with_options(p) for p in gpu] + [ALIASES["cpu"]]
    check_available(requested)
    name = ALIASES[requested]
    return [name] if name == ALIASES["cpu"] else [_with_options(name), ALIASES["cpu"]]


def available_choices() -> list[str]:
    """The provider choices this onnxruntime can run, spelled as the commands take them."""
    available = ort.get_available_providers()
    ours = [alias for alias, name in ALIASES.items() if name in available]
    return ["auto", *ours, *([OPENVINO] if openvino_installed() else [])]


def check_available(requested: str) -> None:
    """An InspectError naming the provider and the choices here when it cannot be used."""
    if requested not in PROVIDER_CHOICES:
        raise InspectError(f"provider {requested!r} is not valid: use one of {PROVIDER_CHOICES}")
    if requested == OPENVINO:
        if openvino_installed():
            return
        raise InspectError(
            f"provider 'openvino' is not available: the openvino package is not installed "
            f"(install the extra: {OPENVINO_EXTRA}); available here: "
            f"{', '.join(available_choices())}"
        )
    if requested == "auto" or ALIASES[requested] in ort.get_available_providers():
        return
    raise InspectError(
        f"provider {requested!r} is not available: this onnxruntime has no "
        f"{ALIASES[requested]}; available here: {', '.join(available_choices())} "
        "(for cuda/tensorrt install onnxruntime-gpu and the CUDA libraries)"
    )


def _with_options(name: str) -> str | tuple[str, dict]:
    if name != ALIASES["tensorrt"]:
        return name
    os.makedirs(TENSORRT_OPTIONS["trt_engine_cache_path"], exist_ok=True)
    return name, dict(TENSORRT_OPTIONS)


def check_active(session: ort.InferenceSession, requested: str) -> None:
    """onnxruntime drops a GPU provider whose libraries fail to load: make that an error."""
    if requested in ("auto", "cpu", OPENVINO):
        return
    active = session.get_providers()
    if ALIASES[requested] not in active:
        raise InspectError(
            f"provider {requested!r} was requested but onnxruntime could not start it "
            f"(active: {active}); check the CUDA/cuDNN/TensorRT libraries, or use the cpu provider"
        )
