"""int8 (static QDQ) vs fp32 for the default model: accuracy on held-out jobs, and speed.

One run: train the default model on synthetic jobs (the demo's settings, fewer epochs), export
it with ``quantize=int8`` (the real export path: ``quant_pre_process``, uint8 activations,
int8 per-channel weights, calibrated on training layers), then
- accuracy of both on held-out synthetic jobs (new jobs, same printers), N and agreement;
- latency at batch 1 and 8, interleaved, medians.
Goals: int8 >= 2.5x faster, <= 1 point accuracy loss.

    python benchmarks/speed/int8.py [--epochs 12] [--repeats 30] [--no-doc]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from common import interleaved, machine, machine_line, med, op_profile, per_int8_class, publish

from inspect3d.config import compose
from inspect3d.data.layers import load_layers
from inspect3d.data.manifest import scan_folder
from inspect3d.data.synth import SynthConfig, generate
from inspect3d.export.onnx import export_run
from inspect3d.export.quantize import compare
from inspect3d.infer import OnnxModel
from inspect3d.train.run import train


def trained_run(tmp: Path, epochs: int, size: int) -> tuple[Path, Path]:
    """(run dir, held-out data dir): synthetic train jobs (seed 0), held-out jobs (seed 1)."""
    data, holdout, run = tmp / "synth", tmp / "holdout", tmp / "run"
    generate(data, SynthConfig(seed=0, n_jobs=16, layers_per_job=12, size=size), progress=False)
    generate(holdout, SynthConfig(seed=1, n_jobs=8, layers_per_job=12, size=size), progress=False)
    overrides = [
        "data=folder", f"data.root={data}", "data.normal_class=ok", f"data.height={size}",
        f"data.width={size}", f"trainer.epochs={epochs}", "trainer.batch_size=8",
        "trainer.progress=false",
    ]  # fmt: skip
    train(compose("train", overrides), run)
    export_run(compose("export", [f"run={run}", "quantize=int8"]))
    return run, holdout


def accuracy(run: Path, holdout: Path) -> dict:
    fp32 = OnnxModel.load(run / "model.onnx", provider="cpu")
    items = scan_folder(holdout)
    classes = fp32.meta.classes
    labels = np.array([classes.index(it.label) if it.label in classes else -1 for it in items])
    layers = load_layers(items, fp32.pre, progress=False)
    out = compare(run / "model.onnx", run / "model.int8.onnx", layers, labels)
    out["n"] = int((labels >= 0).sum())
    out["n_jobs"] = len({it.job for it in items})
    return out


def speed(run: Path, repeats: int) -> dict:
    models = {
        name: OnnxModel.load(run / f"model{suffix}.onnx", provider="cpu")
        for name, suffix in (("fp32", ""), ("int8", ".int8"))
    }
    pre = models["fp32"].pre
    out = {}
    for batch in (1, 8):
        x = np.random.default_rng(0).integers(0, 255, (batch, 1, *pre.size), dtype=np.uint8)
        ms = interleaved({k: (lambda m=m, x=x: m.run(x)) for k, m in models.items()}, repeats)
        out[batch] = {k: med(v) for k, v in ms.items()}
    x = np.random.default_rng(0).integers(0, 255, (1, 1, *pre.size), dtype=np.uint8)
    out["profile"] = {k: op_profile(m.path, x) for k, m in models.items()}
    return out


def report(res: dict, args) -> str:
    acc = res["accuracy"]
    lines = [
        "## int8 vs fp32 (`benchmarks/speed/int8.py`)",
        "",
        f"Machine: {machine_line(res['machine'])}. Default model (smallcnn) trained "
        f"{args.epochs} epochs on synthetic jobs at {args.size} px; int8 = static QDQ (uint8 "
        "activations, int8 per-channel weights) calibrated on training layers, the `inspect3d "
        "export quantize=int8` path.",
        "",
        f"Held-out synthetic jobs (N = {acc['n']} layers, {acc['n_jobs']} jobs): accuracy fp32 "
        f"**{acc['fp32']:.3f}**, int8 **{acc['int8']:.3f}** "
        f"({100 * (acc['int8'] - acc['fp32']):+.1f} points); same class on "
        f"{100 * acc['agreement']:.0f}% of layers.",
        "",
        "| batch | fp32 ms | int8 ms | int8 speed-up |",
        "|---|---|---|---|",
    ]
    for batch, r in res["speed"].items():
        if batch == "profile":
            continue
        lines.append(
            f"| {batch} | {r['fp32']:.2f} | {r['int8']:.2f} | **{r['fp32'] / r['int8']:.2f}x** |"
        )
    lines += ["", "Where the time goes (onnxruntime profiler, share of kernel time, batch 1):", "",
              "| op | fp32 | int8 |", "|---|---|---|"]  # fmt: skip
    prof = res["speed"]["profile"]
    ops = sorted(set(prof["fp32"]) | set(prof["int8"]), key=lambda o: -_share(prof, o))
    for op in ops[:8]:
        fp32, int8 = (100 * prof[k].get(op, 0) for k in ("fp32", "int8"))
        lines.append(f"| {op} | {fp32:.0f}% | {int8:.0f}% |")
    lines += [
        "",
        f"CPU features: {res['machine']['cpu_flags']}. onnxruntime's int8 convolutions gain "
        "most with VNNI (avx512_vnni / avx_vnni) or AMX; on AVX2 alone the u8 x s8 products go "
        "through 16-bit intermediate sums, so the speed-up is smaller than on newer CPUs.",
    ]
    return "\n".join(lines)


def _share(prof: dict, op: str) -> float:
    return max(prof["fp32"].get(op, 0.0), prof["int8"].get(op, 0.0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    res: dict = {"machine": machine()}
    print(machine_line(res["machine"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        run, holdout = trained_run(Path(tmp), args.epochs, args.size)
        res["accuracy"] = accuracy(run, holdout)
        res["speed"] = speed(run, args.repeats)
    publish(per_int8_class("int8"), report(res, args), res, doc=not args.no_doc)


if __name__ == "__main__":
    main()
