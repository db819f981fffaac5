"""``inspect3d predict MODEL.onnx PATH... [--jsonl]``: score layer images with onnxruntime or
OpenVINO; stderr says which runtime scored (and, for OpenVINO, its parity with onnxruntime)."""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path

from inspect3d.data.layout import is_image, list_images, natural_key
from inspect3d.errors import InspectError
from inspect3d.infer.model import LayerScore, OnnxModel
from inspect3d.infer.overlay import write_score_overlay
from inspect3d.infer.providers import PROVIDER_CHOICES, check_available

GLOB_CHARS = frozenset("*?[")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="inspect3d predict", description="Score layer images with an exported model."
    )
    p.add_argument("model", help="model.onnx written by `inspect3d export`")
    p.add_argument(
        "paths",
        nargs="+",
        help="layer image files, folders (searched recursively) or quoted globs ('jobs/*/*.png')",
    )
    p.add_argument("--jsonl", action="store_true", help="one JSON object per layer on stdout")
    p.add_argument(
        "--provider",
        default="auto",
        choices=PROVIDER_CHOICES,
        help="runtime/provider (auto: TensorRT/CUDA when present, else OpenVINO on x86 when "
        "installed, else onnxruntime's CPU provider; openvino needs inspect3d[openvino])",
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
        help="write a defect-map overlay PNG per layer into this folder, in the layers' "
        "subfolders below their common folder (a/x.png and b/x.png do not collide)",
    )
    p.add_argument(
        "--parts",
        type=Path,
        default=None,
        help="folder of part masks named like the layers (white = part; CAD slices), used by "
        "normal-only models fitted with part masks",
    )
    p.add_argument("--batch-size", type=int, default=8)
    return p


def expand_paths(paths: list[str]) -> list[Path]:
    """Files as given, folders as their images in natural order, globs as what they match;
    a path that does not exist or a glob that matches nothing is an error."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists() and GLOB_CHARS & set(raw):
            out += _expand_glob(raw)
        elif path.is_dir():
            out += _folder_images(raw)
        elif path.is_file():
            out.append(path)
        else:
            raise InspectError(f"path {raw!r} does not exist")
    return out


def _folder_images(raw: str) -> list[Path]:
    found = list_images(Path(raw), recursive=True)
    if not found:
        raise InspectError(f"folder {raw!r} holds no layer images")
    return found


def _expand_glob(pattern: str) -> list[Path]:
    """A quoted glob (``**`` recursive): its files, and the images of the folders it matches."""
    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True), key=natural_key)
    if not matches:
        raise InspectError(f"glob {pattern!r} matches no files")
    out: list[Path] = []
    for m in matches:
        out += _folder_images(m) if Path(m).is_dir() else [Path(m)]
    return out


def overlay_folders(paths: list[Path], overlay_dir: Path) -> dict[Path, Path]:
    """Where each layer's overlay goes: ``overlay_dir`` + the layer's folder relative to the
    common folder of all inputs, so same-named layers of two printers or jobs do not collide."""
    parents = [os.path.abspath(p.parent) for p in paths]
    root = os.path.commonpath(parents) if parents else ""
    return {p: overlay_dir / os.path.relpath(d, root) for p, d in zip(paths, parents, strict=True)}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    check_available(args.provider)  # before the model: a missing provider is not a bad file
    model = OnnxModel.load(args.model, provider=args.provider, threshold=args.threshold)
    paths = expand_paths(args.paths)
    if args.overlay_dir is not None:
        args.overlay_dirs = overlay_folders(paths, args.overlay_dir)
        args.roi = model.meta.roi  # outlined on the overlays; None = the whole layer
    failures = 0
    if args.parts is not None and not args.parts.is_dir():
        raise InspectError(f"--parts {str(args.parts)!r} is not a folder of part masks")
    for path, result in model.predict_files(paths, args.batch_size, parts_dir=args.parts):
        if isinstance(result, InspectError):
            failures += _report_error(path, str(result), args)
        else:
            _emit(result, path, args)
    _report_runtime(model)
    if failures:
        print(f"{failures} of {len(paths)} layer(s) could not be scored", file=sys.stderr)
    return 1 if failures else 0


def _report_runtime(model: OnnxModel) -> None:
    parity = getattr(model.session, "parity", None)  # OpenVINO's check of its first batch
    print(f"scored with {model.runtime}" + (f"; {parity}" if parity else ""), file=sys.stderr)


def _emit(score: LayerScore, path: Path, args: argparse.Namespace) -> None:
    record = score.to_dict()
    if args.overlay_dir is not None and is_image(path):
        folder = args.overlay_dirs[path]
        record["overlay"] = str(write_score_overlay(score, folder, roi=args.roi))
    if args.jsonl:
        print(json.dumps(record), flush=True)
        return
    verdict = "DEFECT" if score.decision == "defect" else "ok"
    shown, p = score.shown_class  # a DEFECT names the likeliest defect class, not "ok"
    print(
        f"{verdict:<6}  {shown:<20} p={p:.3f}  "
        f"defect_score={score.defect_score:.3f} (threshold {score.threshold:.3f})  {score.path}",
        flush=True,
    )


def _report_error(path: Path, message: str, args: argparse.Namespace) -> int:
    if args.jsonl:
        print(json.dumps({"path": str(path), "error": message}), flush=True)
    print(f"error: {message}", file=sys.stderr)
    return 1
