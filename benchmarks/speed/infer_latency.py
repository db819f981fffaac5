"""Per-layer scoring speed of the default model on CPU, stage by stage, against its limits.

In one run, on real layer files (PBLM 1024x1024 and 3772x3302 JPEGs from ../shared/datasets
when present, else synthetic layers saved as JPEG at those sizes):
1. stages per layer at batch 1: read + decode (full, and reduced-resolution) / preprocess /
   inference / postprocess, and the layers/s of ``predict_files`` (decode overlapped with
   inference) vs decoding then scoring in turn;
2. onnxruntime fp32 vs torch eager, batch 1 and 8, interleaved (goal >= 3x at batch 1);
3. achieved GFLOP/s of inference vs onnxruntime's own fp32 SGEMM rate on this machine, for the
   default model and a wide one (resnet18), with arithmetic intensity (FLOPs per byte of conv
   activations) to show what bounds each.

    python benchmarks/speed/infer_latency.py [--size 512] [--repeats 30] [--no-doc]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch
from common import (
    RESULTS,
    conv_flops,
    interleaved,
    machine,
    machine_line,
    med,
    save_results,
    sgemm_peak,
    timed,
    update_section,
)

from inspect3d.data.preprocess import Preprocess, decode_image
from inspect3d.data.synth import SynthConfig, render_job
from inspect3d.export.onnx import export_onnx
from inspect3d.infer import OnnxModel
from inspect3d.infer.metadata import ModelMeta
from inspect3d.models import ScoringNet, build_model

PBLM = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "pblm"
CLASSES = ["ok", "a", "b", "c", "d"]


def layer_files(tmp: Path) -> dict[str, Path]:
    """{label: JPEG path} for a 1024x1024 and a 3772x3302 layer."""
    real = {
        "1024x1024": sorted((PBLM / "Powder_Uneven").glob("*.jpg"))[:1],
        "3772x3302": sorted((PBLM / "Plateform_Powder_Uneven").glob("*.jpg"))[:1],
    }
    if all(real.values()):
        return {k: v[0] for k, v in real.items()}
    image = render_job(SynthConfig(seed=0, size=512, layers_per_job=2), 1)[1][0]
    out = {}
    for w, h in ((1024, 1024), (3772, 3302)):
        path = tmp / f"synthetic {w}x{h}.jpg"
        cv2.imwrite(str(path), cv2.resize(image, (w, h)), [cv2.IMWRITE_JPEG_QUALITY, 95])
        out[f"{w}x{h}"] = path
    return out


def exported(name: str, pre: Preprocess, tmp: Path) -> tuple[ScoringNet, OnnxModel]:
    torch.manual_seed(0)
    net = ScoringNet(build_model(name, len(CLASSES), pre)).eval()
    meta = ModelMeta(classes=CLASSES, normal_class="ok", preprocess=pre, threshold=0.5)
    sample = np.random.default_rng(0).integers(0, 255, (2, 1, *pre.size), dtype=np.uint8)
    path = export_onnx(net, meta, tmp / f"{name}.onnx", 18, sample, 1e-3)
    return net, OnnxModel.load(path, provider="cpu")


def stages(model: OnnxModel, path: Path, repeats: int) -> dict:
    """Median ms per stage for one layer file, decode both ways."""
    pre = model.pre
    data = np.fromfile(str(path), np.uint8)
    full = decode_image(data, 1)[0]
    reduced = decode_image(data, 1, "x", pre.size)[0]
    x = pre(full)[None]
    probs, maps = model.run(x)
    read = med(timed(lambda: np.fromfile(str(path), np.uint8), repeats))
    return {
        "read_ms": read,
        "decode_full_ms": med(timed(lambda: decode_image(data, 1), repeats)),
        "decode_reduced_ms": med(timed(lambda: decode_image(data, 1, "x", pre.size), repeats)),
        "preprocess_full_ms": med(timed(lambda: pre(full), repeats)),
        "preprocess_reduced_ms": med(timed(lambda: pre(reduced), repeats)),
        "inference_ms": med(timed(lambda: model.run(x), repeats)),
        "postprocess_ms": med(
            timed(lambda: model._score(probs[0], maps[0, 0], str(path)).to_dict(), repeats)
        ),
    }


def throughput(model: OnnxModel, path: Path, n: int, batch: int) -> dict:
    """layers/s over ``n`` files: overlapped ``predict_files`` vs decode-then-score in turn."""
    files = [path] * n

    def in_turn():
        for start in range(0, n, batch):
            model.run(np.stack([model.pre.load(p) for p in files[start : start + batch]]))

    def overlapped():
        for _ in model.predict_files(files, batch):
            pass

    ms = interleaved({"in_turn": in_turn, "overlapped": overlapped}, 6)
    return {k: n / (med(v) / 1e3) for k, v in ms.items()}


def batch_and_threads(model_path: str, pre: Preprocess, repeats: int) -> dict:
    """ms per layer for batch sizes x intra-op threads: which shape keeps the cores busy."""
    out = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        model = OnnxModel.load(model_path, provider="cpu", threads=threads)
        for batch in (1, 2, 4, 8):
            x = np.random.default_rng(3).integers(0, 255, (batch, 1, *pre.size), dtype=np.uint8)
            ms = med(timed(lambda m=model, x=x: m.run(x), max(3, repeats // batch)))
            out[f"{threads}x{batch}"] = {"threads": threads, "batch": batch, "ms": ms / batch}
    return out


def ort_vs_torch(net: ScoringNet, model: OnnxModel, pre: Preprocess, repeats: int) -> dict:
    """Interleaved medians at the same thread count, all cores and one core.

    onnxruntime runs without spinning here (idle spinning workers would eat into torch's turn).
    The one-thread rows are the robust ones on a busy machine: torch's OpenMP regions wait at
    every op for a thread the OS may have parked, which inflates its multi-thread times.
    """
    out, default_threads = {}, torch.get_num_threads()
    for threads in sorted({1, default_threads}, reverse=True):
        torch.set_num_threads(threads)
        session = OnnxModel.load(model.path, provider="cpu", threads=threads, spinning=False)
        for batch in (1, 8):
            x = np.random.default_rng(1).integers(0, 255, (batch, 1, *pre.size), dtype=np.uint8)
            xt = torch.from_numpy(x)

            def eager(xt=xt):
                with torch.inference_mode():
                    net(xt)

            ms = interleaved(
                {"onnxruntime": lambda x=x, m=session: m.run(x), "torch": eager}, repeats
            )
            out[f"{threads}x{batch}"] = {"threads": threads, "batch": batch} | {
                k: med(v) for k, v in ms.items()
            }
    torch.set_num_threads(default_threads)
    return out


def efficiency(model: OnnxModel, repeats: int, peak: float) -> dict:
    flops, traffic = conv_flops(model.path)
    x = np.random.default_rng(2).integers(0, 255, (1, 1, *model.pre.size), dtype=np.uint8)
    ms = med(timed(lambda: model.run(x), repeats))
    achieved = flops / (ms * 1e-3) / 1e9
    return {
        "gflop": flops / 1e9,
        "ms": ms,
        "floor_ms": flops / (peak * 1e9) * 1e3,
        "gflops": achieved,
        "share_of_peak": achieved / peak,
        "flop_per_byte": flops / traffic,
    }


def report(args, res: dict) -> str:
    s, pre = res["stages"], args.size
    lines = [
        "## Scoring a layer on CPU, stage by stage (`benchmarks/speed/infer_latency.py`)",
        "",
        f"Machine: {machine_line(res['machine'])}. Default model: smallcnn, input {pre}x{pre} "
        f"grey, batch 1, medians of {args.repeats} runs; layer files: {res['source']}.",
        "",
        "| layer file | read | decode full | decode reduced | preprocess (after full / "
        "reduced) | inference | postprocess | total (reduced) | layers/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, st in s.items():
        total = (
            st["read_ms"] + st["decode_reduced_ms"] + st["preprocess_reduced_ms"]
            + st["inference_ms"] + st["postprocess_ms"]
        )  # fmt: skip
        lines.append(
            f"| {name} | {st['read_ms']:.2f} | {st['decode_full_ms']:.1f} | "
            f"{st['decode_reduced_ms']:.1f} | {st['preprocess_full_ms']:.2f} / "
            f"{st['preprocess_reduced_ms']:.2f} | {st['inference_ms']:.1f} | "
            f"{st['postprocess_ms']:.3f} | {total:.1f} | {1e3 / total:.0f} |"
        )
    lines += [
        "",
        "All times in ms. Reduced decode: libjpeg DCT scaling to the smallest power-of"
        "-two fraction still >= the model input (training reads files the same way).",
        "",
    ]
    lines += ["| files, batch 8 | decode then score in turn | decode overlapped (predict_files) "
              "| ratio |", "|---|---|---|---|"]  # fmt: skip
    for name, t in res["throughput"].items():
        lines.append(
            f"| {name} | {t['in_turn']:.0f} layers/s | {t['overlapped']:.0f} layers/s | "
            f"{t['overlapped'] / t['in_turn']:.2f}x |"
        )
    lines += ["", "| threads | batch | onnxruntime fp32 ms | torch eager ms | speed-up |",
              "|---|---|---|---|---|"]  # fmt: skip
    for r in res["ort_vs_torch"].values():
        lines.append(
            f"| {r['threads']} | {r['batch']} | {r['onnxruntime']:.1f} | {r['torch']:.1f} | "
            f"**{r['torch'] / r['onnxruntime']:.2f}x** |"
        )
    lines += ["", "| intra-op threads | batch | ms per layer |", "|---|---|---|"]
    for r in res["shapes"].values():
        lines.append(f"| {r['threads']} | {r['batch']} | {r['ms']:.1f} |")
    lines += ["", f"fp32 SGEMM on this machine (onnxruntime MatMul 1024^3): "
              f"**{res['peak_gflops']:.1f} GFLOP/s**.", "",
              "| model | GFLOP/layer | inference ms | floor ms (at SGEMM rate) | GFLOP/s | "
              "share of SGEMM rate | FLOP per byte of conv activations |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, e in res["efficiency"].items():
        lines.append(
            f"| {name} | {e['gflop']:.2f} | {e['ms']:.1f} | {e['floor_ms']:.1f} | "
            f"{e['gflops']:.1f} | {100 * e['share_of_peak']:.0f}% | {e['flop_per_byte']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=512, help="model input size (px)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--no-doc", action="store_true", help="print only; leave docs/speed.md")
    args = ap.parse_args()
    pre = Preprocess(height=args.size, width=args.size)
    m = machine() | {"torch_threads": torch.get_num_threads()}
    res: dict = {"machine": m, "size": args.size}
    print(machine_line(res["machine"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        files = layer_files(Path(tmp))
        res["source"] = "PBLM (real)" if PBLM in files["1024x1024"].parents else "synthetic"
        net, model = exported("smallcnn", pre, Path(tmp))
        res["stages"] = {k: stages(model, p, args.repeats) for k, p in files.items()}
        res["throughput"] = {k: throughput(model, p, 32, 8) for k, p in files.items()}
        res["ort_vs_torch"] = ort_vs_torch(net, model, pre, args.repeats)
        res["shapes"] = batch_and_threads(model.path, pre, args.repeats)
        res["peak_gflops"] = sgemm_peak()
        _, wide = exported("resnet18", pre, Path(tmp))
        res["efficiency"] = {
            "smallcnn (default)": efficiency(model, args.repeats, res["peak_gflops"]),
            "resnet18": efficiency(wide, max(5, args.repeats // 5), res["peak_gflops"]),
        }
    text = report(args, res)
    print(text)
    save_results(RESULTS, "infer_latency", res)
    if not args.no_doc:
        update_section("infer_latency", text)


if __name__ == "__main__":
    main()
