"""The GPU check, one prepared script for a session lent a GPU machine (also runs on CPU).

1. the card (nvidia-smi) and torch's view of it;
2. training on the device: images/s of the default model and resnet18 with mixed precision
   (bf16/fp16 autocast, channels_last) vs fp32, same data, same run;
3. scoring with onnxruntime on the device when onnxruntime-gpu is installed: CUDA provider with
   and without I/O binding, TensorRT fp16 when present, parity against the CPU provider.
Writes ``$OUT/gpu.json`` (or ``benchmarks/speed/results/gpu.json``) and prints a summary.

    python benchmarks/speed/gpu.py [--device cuda] [--epochs 2] [--size 512]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from common import RESULTS, interleaved, machine, med, save_results

from inspect3d.config import compose
from inspect3d.data.synth import SynthConfig, generate
from inspect3d.export.onnx import export_run
from inspect3d.infer import OnnxModel
from inspect3d.train.run import train


def card() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
        return out.stdout.strip() or out.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no nvidia-smi ({exc})"


def train_speed(data: Path, tmp: Path, model: str, amp: bool, args) -> dict:
    """images/s of a short training run (whole run timed, validation included)."""
    run = tmp / f"{model}-{'amp' if amp else 'fp32'}"
    cfg = compose("train", [
        "data=folder", f"data.root={data}", "data.normal_class=ok", f"data.height={args.size}",
        f"data.width={args.size}", f"model={model}", f"trainer.epochs={args.epochs}",
        f"trainer.batch_size={args.batch}", f"trainer.device={args.device}",
        f"trainer.amp={str(amp).lower()}", "trainer.progress=false",
    ])  # fmt: skip
    t = time.perf_counter()
    metrics, _ = train(cfg, run)
    seconds = time.perf_counter() - t
    images = metrics["split"]["n_train"] * args.epochs
    return {"run": str(run), "seconds": seconds, "images_per_s": images / seconds}


def ort_speed(model_path: Path, args) -> dict:
    """Latency per provider / binding, and parity with the CPU provider."""
    available = ort.get_available_providers()
    out: dict = {"available": available}
    cpu = OnnxModel.load(model_path, provider="cpu")
    x = np.random.default_rng(0).integers(0, 255, (8, 1, args.size, args.size), dtype=np.uint8)
    ref = cpu.run(x)
    variants = {"cpu": cpu}
    for name, provider in (
        ("cuda", "CUDAExecutionProvider"),
        ("tensorrt", "TensorrtExecutionProvider"),
    ):
        if provider in available:
            variants[name] = OnnxModel.load(model_path, provider=name)
    if "cuda" in variants:
        plain = OnnxModel.load(model_path, provider="cuda")
        plain.io_binding = False
        variants["cuda-no-binding"] = plain
    for name, m in variants.items():
        got = m.run(x)
        out[f"{name}_max_abs_diff"] = float(
            max(np.abs(a - b).max() for a, b in zip(got, ref, strict=True))
        )
    for batch in (1, 8):
        ms = interleaved({k: (lambda m=m, b=batch: m.run(x[:b])) for k, m in variants.items()}, 30)
        out[f"batch{batch}_ms"] = {k: med(v) for k, v in ms.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--models", default="smallcnn,resnet18")
    args = ap.parse_args()
    res: dict = {"machine": machine(), "card": card(), "torch": torch.__version__,
                 "cuda": torch.cuda.is_available()}  # fmt: skip
    if torch.cuda.is_available():
        res["torch_device"] = torch.cuda.get_device_name(0)
        res["bf16"] = torch.cuda.is_bf16_supported()
    print(json.dumps(res, indent=1), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "synth"
        generate(data, SynthConfig(seed=0, n_jobs=16, layers_per_job=16, size=args.size), False)
        res["train"] = {}
        for model in args.models.split(","):
            for amp in (True, False):
                key = f"{model}/{'amp' if amp else 'fp32'}"
                res["train"][key] = train_speed(data, Path(tmp), model, amp, args)
                print(key, res["train"][key], flush=True)
        run = Path(res["train"][f"{args.models.split(',')[0]}/amp"]["run"])
        export_run(compose("export", [f"run={run}"]))
        res["onnxruntime"] = ort_speed(run / "model.onnx", args)
    print(json.dumps(res, indent=1))
    save_results(Path(os.environ.get("OUT") or RESULTS), "gpu", res)


if __name__ == "__main__":
    main()
