"""``inspect3d predict MODEL.onnx PATH... [--jsonl]``: score layer images with onnxruntime."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from inspect3d.data.layout import is_image, list_images
from inspect3d.errors import InspectError
from inspect3d.infer.model import LayerScore, OnnxModel
from inspect3d.infer.overlay import write_overlay
from inspect3d.infer.providers import PROVIDER_CHOICES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="inspect3d predict", description="Score layer images with an exported model."
    )
    p.add_argument("model", help="model.onnx written by `inspect3d export`")
    p.add_argument("paths", nargs="+", help="layer image files or folders (searched recursively)")
    p.add_argument("--jsonl", action="store_true", help="one JSON object per layer on stdout")
    p.add_argument(
        "--provider",
        default="auto",
        choices=PROVIDER_CHOICES,
        help="onnxruntime provider (auto: TensorRT/CUDA when present, else CPU)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="defect-score threshold (default: the calibrated one in the model)",
    )
    p.add_argument(
        "--overlay-dir",
        type=Path,
        default=None,
        help="write a defect-map overlay PNG per layer into this folder",
    )
    p.add_argument("--batch-size", type=int, default=8)
    return p


def expand_paths(paths: list[str]) -> list[Path]:
    """Files as given, folders as their images in natural order; bad paths are errors."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = list_images(path, recursive=True)
            if not found:
                raise InspectError(f"folder {raw!r} holds no layer images")
            out += found
        elif path.is_file():
            out.append(path)
        else:
            raise InspectError(f"path {raw!r} does not exist")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    model = OnnxModel.load(args.model, provider=args.provider, threshold=args.threshold)
    paths = expand_paths(args.paths)
    failures = 0
    for path, result in model.predict_files(paths, args.batch_size):
        if isinstance(result, InspectError):
            failures += _report_error(path, str(result), args)
        else:
            _emit(result, args)
    if failures:
        print(f"{failures} of {len(paths)} layer(s) could not be scored", file=sys.stderr)
    return 1 if failures else 0


def _emit(score: LayerScore, args: argparse.Namespace) -> None:
    record = score.to_dict()
    if args.overlay_dir is not None and score.path and is_image(Path(score.path)):
        record["overlay"] = str(write_overlay(score.path, score.defect_map, args.overlay_dir))
    if args.jsonl:
        print(json.dumps(record), flush=True)
        return
    verdict = "DEFECT" if score.decision == "defect" else "ok"
    print(
        f"{verdict:<6}  {score.label:<20} p={score.probs[score.label]:.3f}  "
        f"defect_score={score.defect_score:.3f} (threshold {score.threshold:.3f})  {score.path}",
        flush=True,
    )


def _report_error(path: Path, message: str, args: argparse.Namespace) -> int:
    if args.jsonl:
        print(json.dumps({"path": str(path), "error": message}), flush=True)
    print(f"error: {message}", file=sys.stderr)
    return 1
