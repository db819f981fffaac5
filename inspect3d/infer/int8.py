"""int8 that pays or is not used: when an int8 model scores, and when its fp32 model does.

The exporter (``export.quantize``) times the int8 model against fp32 with each runtime installed
at the batch sizes ``BATCHES`` and writes into the int8 model's metadata ``int8_speed``::

    {"cpu": "AMD EPYC ...", "flags": "avx2 fma", "int8_class": "none",
     "speedup": {"onnxruntime": {"1": 0.93, "8": 1.35, "16": 1.3}, "openvino": {...}},
     "check": {"fp32": 0.91, "int8": 0.905, "agreement": 0.99, "same_decision": 0.98}}

(speed-up = fp32 time / int8 time, medians; check = validation accuracy of each, same class,
same decision at the threshold). Loading an int8 model on a CPU then decides, for the runtime
that scores:

- int8 more than ``MAX_ACCURACY_LOSS`` (1 point) less accurate than fp32 on the validation
  layers: fp32, on every CPU;

- measured with this runtime on a CPU of the same int8 class (``cpu.int8_class``: none, vnni,
  amx): int8 iff it was at least as fast as fp32 at *every* batch size measured;
- not measured there: int8 iff this CPU has VNNI or AMX (int8 dot-product instructions; without
  them int8 convolutions go through 16-bit sums and often lose to fp32);
- else the fp32 model beside it (``model.onnx`` for ``model.int8.onnx``) scores, and the log
  says why; without one the int8 model scores, with a warning.

A GPU provider is left alone (it was asked for by name or found first).
"""

from __future__ import annotations

import logging
from pathlib import Path

from inspect3d.infer.cpu import int8_class
from inspect3d.infer.metadata import ModelMeta

log = logging.getLogger(__name__)

BATCHES = (1, 8, 16)  # predict's default batch, and the watcher's (8 and 16)
MAX_ACCURACY_LOSS = 0.01
SUFFIX = ".int8.onnx"


def int8_verdict(speed: dict, runtime: str, cpu_class: str) -> tuple[bool, str]:
    """(whether int8 pays, why) for ``runtime`` on a CPU of ``cpu_class``."""
    if lost := accuracy_loss(speed):
        return False, f"int8 is {100 * lost:.1f} points less accurate than fp32 on validation"
    same_class = speed.get("int8_class") == cpu_class
    measured = speed.get("speedup", {}).get(runtime) if same_class else None
    if measured:
        ratios = ", ".join(f"{float(r):.2f}x at batch {b}" for b, r in measured.items())
        pays = min(float(r) for r in measured.values()) >= 1.0
        where = f"on {speed.get('cpu', '?')} ({speed.get('flags', '?')})"
        return pays, f"int8 vs fp32 with {runtime} measured {where}: {ratios}"
    if cpu_class != "none":
        return True, f"this CPU has {cpu_class.upper()} int8 instructions ({runtime} not measured)"
    return False, f"this CPU has no VNNI/AMX and {runtime} was not measured faster in int8 here"


def accuracy_loss(speed: dict) -> float | None:
    """fp32 - int8 validation accuracy where above ``MAX_ACCURACY_LOSS``, else None."""
    check = speed.get("check") or {}
    fp32, int8 = check.get("fp32"), check.get("int8")
    if fp32 is None or int8 is None or fp32 - int8 <= MAX_ACCURACY_LOSS:
        return None
    return fp32 - int8


def fp32_sibling(path: Path) -> Path | None:
    """``model.onnx`` for ``model.int8.onnx``; None for a name without the int8 suffix."""
    if not path.name.endswith(SUFFIX):
        return None
    return path.with_name(path.name[: -len(SUFFIX)] + ".onnx")


def fp32_instead(meta: ModelMeta, path: Path, runtime: str) -> Path | None:
    """The fp32 model to load instead of the int8 model ``path`` where int8 does not pay here;
    None to keep ``path`` (an fp32 model, int8 that pays, or no fp32 model beside it)."""
    if meta.quantization == "none":
        return None
    pays, why = int8_verdict(meta.int8_speed, runtime, int8_class())
    if pays:
        log.info("%s scores in int8: %s", path.name, why)
        return None
    fp32 = fp32_sibling(path)
    if fp32 is None or not fp32.is_file():
        log.warning("%s scores in int8 although %s: no fp32 model beside it", path.name, why)
        return None
    log.warning("int8 not used (%s): %s scores instead of %s", why, fp32.name, path.name)
    return fp32
