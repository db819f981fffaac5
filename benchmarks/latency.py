"""Per-layer latency of the default model: onnxruntime (CPU) vs torch eager, batch 1.

Both variants are measured in the same run, interleaved, on the same preprocessed 1024x1024
layer; the report gives medians and their ratio (absolute times on shared machines are noise).

    python benchmarks/latency.py [--size 1024] [--repeats 30] [--out docs/speed.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from inspect3d.data.preprocess import Preprocess
from inspect3d.data.synth import SynthConfig, render_job
from inspect3d.export.onnx import export_onnx
from inspect3d.infer import OnnxModel
from inspect3d.infer.metadata import ModelMeta
from inspect3d.models import ScoringNet, build_model


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=1024, help="layer and model input size (px)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None, help="append the result to this markdown")
    args = ap.parse_args()

    pre = Preprocess(height=args.size, width=args.size)
    net = ScoringNet(build_model("smallcnn", 5, pre)).eval()
    image, _, _ = render_job(SynthConfig(seed=0, size=args.size, layers_per_job=2), 1)[1]
    x = pre(image)[None]
    meta = ModelMeta(
        classes=["ok", "a", "b", "c", "d"],
        normal_class="ok",
        preprocess=pre,
        threshold=0.5,
        model_name="smallcnn",
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(net, meta, Path(tmp) / "m.onnx", 18, np.repeat(x, 2, 0), 1e-4)
        model = OnnxModel.load(path, provider="cpu")
        xt = torch.from_numpy(x)

        def torch_eager():
            with torch.inference_mode():
                net(xt)

        ort_ms, torch_ms = [], []
        for _ in range(3):  # interleave so drifting machine load hits both alike
            ort_ms += timed(lambda: model.run(x), args.repeats // 3)
            torch_ms += timed(torch_eager, args.repeats // 3)
        jpeg = Path(tmp) / "layer 0001.jpg"
        cv2.imwrite(str(jpeg), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
        pre_ms = timed(lambda: pre.load(jpeg), args.repeats)
    report(args, ort_ms, torch_ms, pre_ms)


def report(args, ort_ms: list[float], torch_ms: list[float], pre_ms: list[float]) -> None:
    med_ort, med_torch = statistics.median(ort_ms), statistics.median(torch_ms)
    lines = [
        f"## Latency, default model (smallcnn), one {args.size}x{args.size} layer, batch 1",
        "",
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"torch {torch.__version__} threads={torch.get_num_threads()}; "
        f"onnxruntime CPU; {len(ort_ms)} runs each, interleaved",
        "",
        "| variant | median ms | min ms |",
        "|---|---|---|",
        f"| onnxruntime fp32 (CPU) | {med_ort:.1f} | {min(ort_ms):.1f} |",
        f"| torch eager fp32 | {med_torch:.1f} | {min(torch_ms):.1f} |",
        f"| decode JPEG + preprocess (OpenCV) | {statistics.median(pre_ms):.2f} | "
        f"{min(pre_ms):.2f} |",
        "",
        f"**onnxruntime vs torch eager: {med_torch / med_ort:.2f}x faster (ratio of medians)**",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
