"""Choosing onnxruntime execution providers: GPU when present, never a silent CPU fallback."""

from __future__ import annotations

import onnxruntime as ort

from inspect3d.errors import InspectError

ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
PROVIDER_CHOICES = ("auto", *ALIASES)


def resolve_providers(requested: str = "auto") -> list[str]:
    """Provider list for a session. ``auto``: TensorRT, CUDA if installed, then CPU."""
    available = ort.get_available_providers()
    if requested == "auto":
        gpu = [p for p in (ALIASES["tensorrt"], ALIASES["cuda"]) if p in available]
        return [*gpu, ALIASES["cpu"]]
    if requested not in ALIASES:
        raise InspectError(f"provider {requested!r} is not valid: use one of {PROVIDER_CHOICES}")
    name = ALIASES[requested]
    if name not in available:
        raise InspectError(
            f"provider {requested!r} ({name}) is not available in this onnxruntime "
            f"(available: {available}); install onnxruntime-gpu with CUDA, or use provider=cpu"
        )
    return [name] if name == ALIASES["cpu"] else [name, ALIASES["cpu"]]


def check_active(session: ort.InferenceSession, requested: str) -> None:
    """onnxruntime drops a GPU provider whose libraries fail to load: make that an error."""
    if requested in ("auto", "cpu"):
        return
    active = session.get_providers()
    if ALIASES[requested] not in active:
        raise InspectError(
            f"provider {requested!r} was requested but onnxruntime could not start it "
            f"(active: {active}); check the CUDA/cuDNN/TensorRT libraries, or use provider=cpu"
        )
