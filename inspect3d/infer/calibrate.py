"""``inspect3d calibrate``: a model's threshold set again on good layers of a new camera.

A model trained on one printer's camera scores another camera's good layers a little higher
or lower. Scoring a few dozen good layers (or frames) of the new camera with onnxruntime and
putting the threshold just above all but ``target_frr`` of them brings the false-reject rate
back to what was asked, whatever the shift; the model itself is unchanged.

The threshold is an order statistic of the good layers' defect scores (as in training and
fit-normal), so the false-reject rate it gives on new good layers follows a Beta law however
the scores are distributed: its mean and 95% interval go into the new file's metadata
(``calibration``: ``expected_frr``, ``frr_ci95``, ``n_calibration``) beside the threshold.
With n good layers a rate below 1/(n + 1) cannot be resolved: 5 layers give 1/6 at best.

The new file is the old one with its ``metadata_props`` rewritten (ONNX's protobuf fields
edited directly, so no ``onnx`` package is needed on a shop-floor PC).
"""

from __future__ import annotations

import datetime as dt
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inspect3d.data.layout import list_images
from inspect3d.errors import InspectError
from inspect3d.infer.model import OnnxModel
from inspect3d.io import write_bytes_atomic
from inspect3d.metrics import order_statistic_frr, wilson_interval

MIN_GOOD = 5
KEYS = ("model", "good", "out", "target_frr", "provider")
USAGE = """usage: inspect3d calibrate model=MODEL.onnx good=DIR [out=NEW.onnx] [target_frr=RATE]

Score the good layers in DIR (images, searched recursively; folders starting with _ skipped)
with MODEL.onnx, set the threshold so that at most RATE of them would be rejected (default:
the model's target_frr), and write NEW.onnx (default MODEL.calibrated.onnx) with the new
threshold and its false-reject interval in the metadata. MODEL.onnx is left as it was.
  provider=auto|cpu|cuda|tensorrt   onnxruntime provider (default auto)
"""


@dataclass(frozen=True)
class Request:
    model: Path
    good: Path
    out: Path
    target_frr: float | None = None
    provider: str = "auto"


@dataclass
class Recalibration:
    """What ``calibrate`` found and wrote."""

    out: Path
    threshold: float
    previous_threshold: float
    target_frr: float
    n_good: int
    rejected_before: int  # good layers at or above the old threshold
    calibration: dict
    skipped: list[str]


def parse_args(args: list[str]) -> Request:
    """``key=value`` arguments; unknown or missing keys are errors naming the valid ones."""
    values: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in KEYS:
            raise InspectError(f"unknown argument {arg!r}: use key=value with keys {list(KEYS)}")
        values[key] = value
    missing = [k for k in ("model", "good") if not values.get(k)]
    if missing:
        raise InspectError(f"calibrate needs {' and '.join(f'{k}=...' for k in missing)}")
    model = Path(values["model"])
    out = Path(values["out"]) if values.get("out") else model.with_suffix(".calibrated.onnx")
    return Request(
        model,
        Path(values["good"]),
        out,
        _rate(values.get("target_frr")),
        values.get("provider", "auto"),
    )


def _rate(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        rate = float(text)
    except ValueError:
        rate = -1.0
    if not 0.0 <= rate < 1.0:
        raise InspectError(f"target_frr={text!r} is not valid: use a rate in [0, 1), e.g. 0.01")
    return rate


def good_layers(folder: Path) -> list[Path]:
    """Image files below ``folder`` (folders starting with ``_`` or ``.`` skipped)."""
    if not folder.is_dir():
        raise InspectError(f"good={str(folder)!r} is not a folder: pass the folder of good layers")
    rel_ok = lambda p: not any(part[0] in "_." for part in p.relative_to(folder).parts[:-1])  # noqa: E731
    paths = [p for p in list_images(folder, recursive=True) if rel_ok(p)]
    if len(paths) < MIN_GOOD:
        raise InspectError(
            f"good={str(folder)!r} holds {len(paths)} layer image(s): calibrating needs at least "
            f"{MIN_GOOD} good layers of the new camera (20+ to resolve a 5% false-reject rate)"
        )
    return paths


def check_model_path(path: Path) -> None:
    if path.suffix.lower() != ".onnx" or not path.is_file():
        what = "not found" if not path.is_file() else "not an ONNX model"
        raise InspectError(
            f"model={str(path)!r} is {what}: pass the .onnx file written by "
            "`inspect3d export run=RUN` (RUN/model.onnx)"
        )


def score_good(model: OnnxModel, paths: list[Path]) -> tuple[np.ndarray, list[str]]:
    """Defect scores of the readable layers, and the files that could not be read."""
    scores, skipped = [], []
    for path, result in model.predict_files(paths):
        if isinstance(result, InspectError):
            skipped.append(f"{path}: {result}")
        else:
            scores.append(result.defect_score)
    if len(scores) < MIN_GOOD:
        raise InspectError(
            f"only {len(scores)} of {len(paths)} good layers could be read (need {MIN_GOOD}): "
            + "; ".join(skipped[:3])
        )
    return np.asarray(scores, dtype=float), skipped


def new_threshold(scores: np.ndarray, target_frr: float) -> tuple[float, dict]:
    """Just above the (n_allowed + 1)-th highest good score, n_allowed = floor(target x n),
    and the false-reject rate that threshold gives on new good layers."""
    s = np.sort(scores)
    n_allowed = int(np.floor(target_frr * s.size))
    threshold = float(np.nextafter(s[s.size - n_allowed - 1], np.inf))
    return threshold, order_statistic_frr(s.size, n_allowed)


def calibrate(req: Request) -> Recalibration:
    """Score the good layers, set the threshold, write the new model file."""
    check_model_path(req.model)
    if req.out.resolve() == req.model.resolve():
        raise InspectError(
            f"out={str(req.out)!r} is the model itself: write the recalibrated model to a new "
            "file (keep the old one to go back to)"
        )
    paths = good_layers(req.good)
    model = OnnxModel.load(req.model, provider=req.provider)
    scores, skipped = score_good(model, paths)
    target = model.meta.target_frr if req.target_frr is None else req.target_frr
    threshold, frr = new_threshold(scores, target)
    before = int((scores >= model.meta.threshold).sum())
    calibration = {
        **model.meta.calibration,
        **frr,
        "method": "inspect3d calibrate: order statistic of good layers of the new camera",
        "good_layers": str(req.good),
        "target_frr": target,
        "previous_threshold": model.meta.threshold,
        "rejected_at_previous": [before, len(scores)],
        "rejected_at_previous_ci95": wilson_interval(before, len(scores)),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    meta = model.meta
    meta.threshold, meta.target_frr, meta.calibration = threshold, target, calibration
    write_bytes_atomic(req.out, with_metadata(req.model.read_bytes(), meta.to_props()))
    OnnxModel.load(req.out, provider="cpu")  # the new file loads and reads back
    return Recalibration(
        req.out,
        threshold,
        calibration["previous_threshold"],
        target,
        len(scores),
        before,
        calibration,
        skipped,
    )


# --- ONNX metadata_props without the onnx package: protobuf wire format -----------------------
# ModelProto field 14 is ``repeated StringStringEntryProto metadata_props`` (key = 1, value = 2).

METADATA_FIELD = 14


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if i >= len(data):
            raise InspectError("not an ONNX model: its protobuf ends inside a number")
        b = data[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not b & 0x80:
            return value, i


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b, value = value & 0x7F, value >> 7
        out.append(b | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _fields(data: bytes):
    """(field number, wire type, raw bytes of the whole field, payload) of a message."""
    i = 0
    while i < len(data):
        start = i
        tag, i = _varint(data, i)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, i = _varint(data, i)
            payload = b""
        elif wire == 2:
            size, i = _varint(data, i)
            payload, i = data[i : i + size], i + size
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
            payload = b""
        else:
            raise InspectError(f"not an ONNX model: protobuf wire type {wire} at byte {start}")
        if i > len(data):
            raise InspectError("not an ONNX model: its protobuf is truncated")
        yield number, wire, data[start:i], payload


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


def _entry(key: str, value: str) -> bytes:
    body = _length_delimited(1, key.encode()) + _length_delimited(2, value.encode())
    return _length_delimited(METADATA_FIELD, body)


def _entry_key(payload: bytes) -> str | None:
    for number, wire, _, value in _fields(payload):
        if number == 1 and wire == 2:
            return value.decode()
    return None


def with_metadata(model: bytes, props: dict[str, str]) -> bytes:
    """The serialised ONNX model with ``props`` as metadata (existing keys replaced, others
    kept, every other field byte for byte as it was)."""
    kept = [
        raw
        for number, wire, raw, payload in _fields(model)
        if not (number == METADATA_FIELD and wire == 2 and _entry_key(payload) in props)
    ]
    return b"".join(kept) + b"".join(_entry(k, v) for k, v in props.items())


# --- command line ------------------------------------------------------------------------------


def report(r: Recalibration) -> str:
    c = r.calibration
    lo, hi = c["frr_ci95"]
    before = c["rejected_at_previous_ci95"]
    lines = [
        f"scored {r.n_good} good layers; at the old threshold {r.previous_threshold:.4f} "
        f"{r.rejected_before}/{r.n_good} were rejected "
        f"(95% CI {100 * before[0]:.1f}-{100 * before[1]:.1f}%)",
        f"new threshold {r.threshold:.4f} for target FRR {100 * r.target_frr:.1f}%: expected "
        f"false-reject rate on new good layers {100 * c['expected_frr']:.1f}% "
        f"(95% interval {100 * lo:.1f}-{100 * hi:.1f}%, n={r.n_good})",
    ]
    if r.n_good + 1 < 1 / max(r.target_frr, 1e-9):
        lines.append(
            f"note: {r.n_good} good layers cannot resolve a {100 * r.target_frr:.1f}% rate; the "
            "threshold sits above all of them: add good layers to tighten it"
        )
    lines += [f"skipped {s}" for s in r.skipped]
    lines.append(f"wrote {r.out}")
    return "\n".join(lines)


def main(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    print(report(calibrate(parse_args(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
