"""``export_onnx``: the scoring network as ONNX with metadata, verified with onnxruntime.

Export means export *and* verify: the file is published only after onnxruntime reproduced
torch's outputs on real layers within the tolerance, which is reported either way (the
``inspect3d.results`` log: ``inspect3d export`` prints it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from omegaconf import OmegaConf

from inspect3d import __version__
from inspect3d.data.layout import list_images
from inspect3d.data.preprocess import Preprocess, check_channels
from inspect3d.errors import InspectError
from inspect3d.infer.metadata import INPUT_NAME, OUTPUT_NAMES, PARTS_INPUT, ModelMeta
from inspect3d.io import atomic_path
from inspect3d.models import ScoringNet
from inspect3d.models.checkpoint import load_checkpoint, model_from_checkpoint
from inspect3d.results import RESULTS

log = logging.getLogger(__name__)
for _name in ("onnxscript", "onnx_ir", "torch.onnx"):  # their INFO lines drown the parity report
    logging.getLogger(_name).setLevel(logging.WARNING)
METRIC_KEYS = ("accuracy", "macro_f1", "auroc", "n", "n_normal", "n_defect", "ci95")


def export_run(cfg: Any) -> list[Path]:
    """``inspect3d export run=RUN``: RUN/model.onnx (+ RUN/model.int8.onnx with quantize=int8)."""
    if cfg.quantize not in ("none", "int8"):
        raise InspectError(f"quantize={cfg.quantize!r} is not valid: use none or int8")
    ckpt = load_checkpoint(Path(cfg.run) / "checkpoint.pt")
    net = ScoringNet(model_from_checkpoint(ckpt)).eval()
    int8 = cfg.quantize == "int8"
    folder = cfg.get("layers")
    layers, labels = real_layers(ckpt, max(cfg.n_check, 64 if int8 else 0), "val", folder)
    meta = meta_from_checkpoint(ckpt, map_stride(net, layers[:1]))
    out = export_onnx(net, meta, Path(cfg.out), cfg.opset, layers[: cfg.n_check], cfg.tolerance)
    paths = [out]
    if int8:
        from inspect3d.export.quantize import quantize_int8

        calib, _ = real_layers(ckpt, cfg.n_calib, "train", folder)
        paths.append(quantize_int8(out, calib, layers, labels))
    return paths


def map_stride(net: ScoringNet, layer: np.ndarray) -> int:
    """Input pixels per defect-map cell, read off the network's own output."""
    with torch.inference_mode():
        _, defect_map = net(*example_inputs(net, layer))
    return layer.shape[-2] // defect_map.shape[-2]


def meta_from_checkpoint(ckpt: dict, defect_map_stride: int) -> ModelMeta:
    metrics = ckpt.get("metrics") or {}
    return ModelMeta(
        classes=list(ckpt["classes"]),
        normal_class=ckpt["normal_class"],
        preprocess=Preprocess.from_dict(ckpt["preprocess"]),
        threshold=float(ckpt.get("threshold") or 0.5),
        target_frr=float(ckpt.get("target_frr", 0.05)),
        model_name=ckpt["model"].get("name", ""),
        config_hash=ckpt.get("config_hash", ""),
        inspect3d_version=__version__,
        metrics={k: metrics[k] for k in METRIC_KEYS if k in metrics},
        defect_map_stride=defect_map_stride,
        mode=ckpt.get("mode", "supervised"),
        calibration=dict(ckpt.get("calibration") or {}),
        map_threshold=1.0 if ckpt.get("mode") == "normal_only" else None,
        roi=ckpt["model"].get("roi"),
    )


def real_layers(
    ckpt: dict, n: int, split: str, folder: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` real layers (uint8 N,C,H,W) and their labels: evenly spaced over the image
    files of ``folder`` (``export layers=DIR``; labels -1, unknown), else over the run's own
    ``train`` or ``val`` split, or the good layers a normal-only model was fitted on (labels 0).
    """
    pre = Preprocess.from_dict(ckpt["preprocess"])
    if folder is not None:
        return _folder_layers(Path(folder), pre, n)
    if ckpt.get("mode") == "normal_only":
        paths = [Path(p) for p in ckpt.get("fit_layers", []) if Path(p).is_file()]
        if not paths:
            raise InspectError(_absent("the good layers this model was fitted on"))
        layers = _evenly(paths, pre, n)
        return layers, np.zeros(len(layers), dtype=int)
    return _split_layers(ckpt, pre, n, split)


def _split_layers(ckpt: dict, pre: Preprocess, n: int, split: str):
    from inspect3d.data.sources import load_data

    trained = OmegaConf.create(ckpt["config"])
    try:
        data = load_data(trained.data, trained.seed)
    except InspectError as exc:
        raise InspectError(_absent(f"the run's {split} layers ({exc})")) from exc
    pool = data.train if split == "train" else data.val
    pick = np.linspace(0, len(pool) - 1, min(n, len(pool))).round().astype(int)
    idx = sorted({pool[i] for i in pick})
    labels = np.array(data.labels())[idx]
    return np.stack([pre.load(data.items[i].path) for i in idx]), labels


def _folder_layers(folder: Path, pre: Preprocess, n: int) -> tuple[np.ndarray, np.ndarray]:
    paths = list_images(folder, recursive=True) if folder.is_dir() else []
    if not paths:
        raise InspectError(f"layers={str(folder)!r} holds no layer images: give a folder of them")
    check_channels(pre.channels, paths, f"layers={str(folder)!r}")  # colour for grey: an error
    layers = _evenly(paths, pre, n)
    return layers, np.full(len(layers), -1)


def _evenly(paths: list[Path], pre: Preprocess, n: int) -> np.ndarray:
    pick = np.linspace(0, len(paths) - 1, min(n, len(paths))).round().astype(int)
    return np.stack([pre.load(paths[i]) for i in sorted(set(pick.tolist()))])


def _absent(what: str) -> str:
    return (
        f"the parity check needs real layers, but {what} are not on this machine: give "
        "layers=DIR, a folder of layer images like the ones the model was trained on"
    )


def export_onnx(
    net: ScoringNet,
    meta: ModelMeta,
    out: Path,
    opset: int,
    layers: np.ndarray,
    tolerance: float,
) -> Path:
    """Write ``out`` (dynamic batch), stamp ``meta``, verify; publish only if parity holds."""
    if opset < 17:
        raise InspectError(f"opset={opset} is not supported: use 17 or newer")
    with atomic_path(out) as tmp:
        _torch_export(net, layers, tmp, opset)
        _stamp(tmp, meta)
        verify(net, tmp, layers, tolerance)
    log.info("wrote %s", out)
    return out


def part_grid(net: ScoringNet, layers: np.ndarray) -> tuple[int, int] | None:
    """The map grid (h, w) of a normal-only net with a part memory (its second input, the
    layer's part cells); None for nets with one input."""
    inner = net.net
    if getattr(inner, "part_scorer", None) is None:
        return None
    return inner.features.grid(*layers.shape[-2:])


def example_inputs(net: ScoringNet, layers: np.ndarray, cells: bool = False) -> tuple:
    """The network's inputs for ``layers``: (layers,) or (layers, part cells), the part cells
    zero (no part mask) or, with ``cells``, a fixed pattern that exercises both branches."""
    x = torch.from_numpy(layers)
    grid = part_grid(net, layers)
    if grid is None:
        return (x,)
    part = torch.zeros(len(layers), 1, *grid)
    if cells:
        part[..., ::3, ::2] = 1.0
    return (x, part)


def _torch_export(net: ScoringNet, layers: np.ndarray, path: Path, opset: int) -> None:
    example = example_inputs(net, np.repeat(layers[:1], 2, axis=0))
    batch = torch.export.Dim("batch", min=1, max=4096)
    names = [INPUT_NAME, PARTS_INPUT][: len(example)]
    torch.onnx.export(
        net,
        example,
        str(path),
        input_names=names,
        output_names=list(OUTPUT_NAMES),
        opset_version=opset,
        dynamic_shapes=tuple({0: batch} for _ in example),
        dynamo=True,
        external_data=False,
        verbose=False,
    )


def _stamp(path: Path, meta: ModelMeta) -> None:
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in meta.to_props().items():
        model.metadata_props.add(key=key, value=value)
    model.doc_string = f"inspect3d {meta.model_name}: classes {meta.classes}"
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def verify(net: ScoringNet, path: Path, layers: np.ndarray, tolerance: float) -> dict:
    """Run torch and onnxruntime (CPU) on the same layers, batch 1 and batch N; compare (for
    a net with a part input: without part cells and with a pattern of them)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cases = [example_inputs(net, layers)]
    if part_grid(net, layers) is not None:
        cases.append(example_inputs(net, layers, cells=True))
    diffs: dict[str, float] = {}
    for inputs in cases:
        for name, diff in _differences(net, session, inputs).items():
            diffs[name] = max(diffs.get(name, 0.0), diff)
    with torch.inference_mode():
        ref = net(*cases[0])[0].numpy()
    onnx_probs = session.run(None, _feeds(cases[0]))[0]
    same_class = float((ref.argmax(1) == onnx_probs.argmax(1)).mean())
    report = ", ".join(f"max |torch - onnxruntime| {k} = {v:.2e}" for k, v in diffs.items())
    RESULTS.info(
        f"parity check on {len(layers)} layers (batch 1 and {len(layers)}): {report}; "
        f"tolerance {tolerance:.1e}; same class on {same_class:.0%}"
    )
    over = {k: d for k, d in diffs.items() if not np.isfinite(d) or d > _allowed(k, net, tolerance)}
    if over:
        name, worst = max(over.items(), key=lambda kv: kv[1])
        raise InspectError(
            f"export parity check FAILED: onnxruntime differs from torch by {worst:.2e} in "
            f"{name} > tolerance {_allowed(name, net, tolerance):.1e}; the model was not written"
        )
    return {**diffs, "same_class": same_class}


# A normal-only map is a nearest-neighbour distance in units of the threshold, computed as
# sqrt(|f|^2 + |b|^2 - 2 f.b): in float32 a cell close to a good patch (map ~0.1) loses about
# 1e-3 of the threshold to cancellation, in torch and onnxruntime alike but not identically.
# Decisions (probs) keep the plain tolerance; the map may differ by up to 0.5% of the threshold.
NORMAL_MAP_TOLERANCE = 5e-3


def _allowed(name: str, net: ScoringNet, tolerance: float) -> float:
    if name == "defect_map" and hasattr(net.net, "scoring"):
        return max(tolerance, NORMAL_MAP_TOLERANCE)
    return tolerance


def _feeds(inputs: tuple) -> dict[str, np.ndarray]:
    names = (INPUT_NAME, PARTS_INPUT)
    return {name: t.numpy() for name, t in zip(names, inputs, strict=False)}


def _differences(net: ScoringNet, session, inputs: tuple) -> dict[str, float]:
    with torch.inference_mode():
        ref = [t.numpy() for t in net(*inputs)]
    batched = session.run(None, _feeds(inputs))
    n = len(inputs[0])
    single = [
        np.concatenate(o)
        for o in zip(
            *(session.run(None, _feeds(tuple(t[i : i + 1] for t in inputs))) for i in range(n)),
            strict=True,
        )
    ]
    # relative above 1: a normal-only map is in units of its threshold and can reach several
    return {
        name: max(_relative(r, b), _relative(r, s))
        for name, r, b, s in zip(OUTPUT_NAMES, ref, batched, single, strict=True)
    }


def _relative(ref: np.ndarray, got: np.ndarray) -> float:
    """max |ref - got| / max(1, |ref|): absolute for values within [-1, 1], relative above."""
    return float((np.abs(ref - got) / np.maximum(1.0, np.abs(ref))).max())
