"""Normal-only scoring at 1280x1024: the whole net vs the feature extractor alone, on CPU.

One run, onnxruntime CPU (2 threads, batch 1), variants interleaved, medians:

* the patch feature extractor alone (frozen EfficientNet-Lite0, stride 8, 152 channels,
  the real offline ImageNet weights) and the whole exported scoring net
  (``ScoringNet(build_normal_net(...))``, as ``inspect3d export`` writes it; with the pixel
  evidence only where the shipped ``normal.pixel_weight`` is above 0) for bank sizes
  1024, 2048, 4096 and 10000: ms per layer and the ratio whole / features (goal: <= 2);
  and the whole net of ``normal.residual=true`` (bank 2048: pixel residual channels and a
  top-8 search instead of the minimum), against the same features alone;
* the nearest-neighbour search alone (its input: the 152 x 128 x 160 feature map) in cheaper
  variants, each against the search as ``MemoryBank`` runs it now and against the backbone:
  other ``BANK_CHUNK`` sizes, the -2 folded into the bank (one elementwise pass fewer),
  tiles over patches x bank rows that stay in cache, an fp16 matmul, and a PCA projection
  152 -> 64 for the search with the exact distance recomputed for the neighbour found.
  Each variant's nearest-neighbour distance is compared with the exact one on a held-out
  layer (max relative error);
* where OpenVINO is installed (``inspect3d[openvino]``), every graph once more on OpenVINO
  (same file, same 2 threads), interleaved in a loop of its own after onnxruntime's (OpenVINO's
  threads slow onnxruntime calls that follow them in one process): its search against its
  backbone in one loop; onnxruntime / OpenVINO across the two loops.

Bank rows and the scored layer are features of synthetic powder-bed layers (speed does not
depend on the values; the errors of the approximate variants do, a little).

    python benchmarks/speed/normal_scoring.py [--repeats 7] [--no-doc]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from common import RESULTS, load_results, machine, machine_line, med, save_results, update_section
from torch import nn

import inspect3d.normal.patch as patch
from inspect3d.config import NormalConfig
from inspect3d.data.preprocess import Preprocess
from inspect3d.export.onnx import _torch_export
from inspect3d.infer.cpu import cpu_flags
from inspect3d.infer.model import session_options
from inspect3d.infer.providers import openvino_installed
from inspect3d.models import ScoringNet

HEIGHT, WIDTH = 1024, 1280
BANKS = (1024, 2048, 4096, 10000)
THREADS = 2
OPSET = 18
for _name in ("onnxscript", "onnx_ir", "torch.onnx"):
    logging.getLogger(_name).setLevel(logging.WARNING)


class FeatureMap(nn.Module):
    """PatchFeatures as an exportable graph of its own: uint8 layer -> (N, 152, h, w)."""

    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


# --- nearest-neighbour search variants: (N, C, h, w) features -> (N, 1, h, w) distances ---


class Chunked(nn.Module):
    """``MemoryBank`` exactly as in inspect3d/normal/patch.py, with its own chunk size."""

    def __init__(self, bank: torch.Tensor, chunk: int) -> None:
        super().__init__()
        self.mb = patch.MemoryBank(*bank.shape)
        self.mb.set_bank(bank)
        self.chunk = chunk

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        old, patch.BANK_CHUNK = patch.BANK_CHUNK, self.chunk
        try:
            return self.mb(feats)
        finally:
            patch.BANK_CHUNK = old


class Fused(nn.Module):
    """d2 = |b|^2 + f (-2 b)^T per (patch tile, bank chunk): one MatMul and one Add, then min.

    ``rows=None``: all patches at once (chunks over the bank only, as now); ``rows=R``: tiles
    of R patches x ``chunk`` bank rows, small enough to stay in cache between the Gemm and
    the min. ``half``: the product in float16 (cast in, cast out).
    """

    def __init__(
        self, bank: torch.Tensor, chunk: int, rows: int | None = None, half: bool = False
    ) -> None:
        super().__init__()
        self.register_buffer("neg2_bank_t", (-2.0 * bank).T.contiguous())
        self.register_buffer("bank_sq", (bank * bank).sum(1))
        self.chunk, self.rows, self.half = chunk, rows, half
        if half:
            self.neg2_bank_t = self.neg2_bank_t.half()

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        n, c, h, w = feats.shape
        f = feats.flatten(2).transpose(1, 2)  # (N, hw, C)
        rows = self.rows or h * w
        out = []
        for r in range(0, h * w, rows):  # tiles over the patches of each layer (static)
            fr = f[:, r : r + rows]
            fr_in = fr.half() if self.half else fr
            best = None
            for start in range(0, self.bank_sq.shape[0], self.chunk):
                stop = start + self.chunk
                prod = fr_in @ self.neg2_bank_t[:, start:stop]
                d2 = (prod.float() if self.half else prod) + self.bank_sq[start:stop]
                part = d2.min(dim=2).values
                best = part if best is None else torch.minimum(best, part)
            out.append(best + (fr * fr).sum(2))
        nearest = torch.cat(out, dim=1) if len(out) > 1 else out[0]
        return nearest.clamp_min(0.0).sqrt().reshape(n, 1, h, w)


class Projected(nn.Module):
    """Search in a PCA projection (C -> ``dims``), then the exact distance to the row found."""

    def __init__(self, bank: torch.Tensor, dims: int, chunk: int, rows: int | None) -> None:
        super().__init__()
        mean = bank.mean(0)
        _, _, v = torch.linalg.svd(bank - mean, full_matrices=False)
        proj = v[:dims].T.contiguous()  # (C, dims)
        bp = (bank - mean) @ proj
        self.register_buffer("mean", mean)
        self.register_buffer("proj", proj)
        self.register_buffer("bank", bank)
        self.register_buffer("neg2_bank_t", (-2.0 * bp).T.contiguous())
        self.register_buffer("bank_sq", (bp * bp).sum(1))
        self.chunk, self.rows = chunk, rows

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        n, c, h, w = feats.shape
        f = feats.flatten(2).transpose(1, 2)  # (N, hw, C)
        fp = (f - self.mean) @ self.proj
        rows = self.rows or h * w
        idx = []
        for r in range(0, h * w, rows):
            fr = fp[:, r : r + rows]
            best_v = best_i = None
            for start in range(0, self.bank_sq.shape[0], self.chunk):
                stop = start + self.chunk
                d2 = fr @ self.neg2_bank_t[:, start:stop] + self.bank_sq[start:stop]
                v, i = d2.min(dim=2)
                i = i + start
                if best_v is None:
                    best_v, best_i = v, i
                else:
                    better = v < best_v
                    best_v, best_i = torch.where(better, v, best_v), torch.where(better, i, best_i)
            idx.append(best_i)
        nearest = self.bank[torch.cat(idx, dim=1) if len(idx) > 1 else idx[0]]  # (N, hw, C)
        d = ((f - nearest) ** 2).sum(2).sqrt()
        return d.reshape(n, 1, h, w)


# --- export and timing ---


def export(module: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Dynamo, opset 18, dynamic batch: the settings of inspect3d.export.onnx._torch_export."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(
        module.eval(),
        (torch.cat([example, example]),),
        str(path),
        input_names=["x"],
        output_names=["y"],
        opset_version=OPSET,
        dynamic_shapes=({0: batch},),
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    return path


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(path), session_options(threads=THREADS), providers=["CPUExecutionProvider"]
    )


def runner(sess: ort.InferenceSession, x: np.ndarray) -> Callable[[], object]:
    name = sess.get_inputs()[0].name
    return lambda: sess.run(None, {name: x})


def interleave(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, list]:
    """One warm-up call each, then ``repeats`` rounds calling every variant once in turn."""
    for fn in variants.values():
        fn()
    out: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            out[name].append((time.perf_counter() - t) * 1e3)
    return out


RESIDUAL_BANK = 2048
PIXEL_WEIGHT = NormalConfig.pixel_weight  # the whole nets as shipped (0: no pixel evidence)
RESIDUAL_KEY = f"whole_{RESIDUAL_BANK}_residual"


def residual_net(pre: Preprocess, layers: np.ndarray, m: int) -> nn.Module:
    """The whole scoring net with ``normal.residual=true`` (pixel residual channels, a top-8
    search among the bank): bank and scales from the patches of ``layers``."""
    net = patch.build_normal_net(
        2, pre, bank_size=m, smooth_px=4.0, roi=None, residual=True, pixel_weight=PIXEL_WEIGHT
    )
    with torch.inference_mode():
        feats = net.features(torch.from_numpy(layers))
    pool = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
    pool = pool[torch.randperm(pool.shape[0])]
    net.scorer.set_bank(pool[:m].contiguous(), pool[m:].contiguous())
    return ScoringNet(net).eval()


def synthetic_layers(pre: Preprocess, n: int) -> np.ndarray:
    """n uint8 (1, 1024, 1280) powder-bed layers from the synthetic generator (good ones)."""
    from inspect3d.data.synth import SynthConfig, render_job

    cfg = SynthConfig(seed=7, layers_per_job=n, size=WIDTH, defect_fraction=0.0)
    return np.stack([pre(img) for img, _, _ in render_job(cfg, 0)[:n]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--eager-repeats", type=int, default=3)
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="rewrite the doc from the JSON")
    args = ap.parse_args()
    if args.report_only:
        update_section("normal_scoring", report(load_results(RESULTS, "normal_scoring")))
        return
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    res: dict = {"machine": machine(), "flags": _flags()}
    res.update(threads=THREADS, repeats=args.repeats, height=HEIGHT, width=WIDTH)
    print(machine_line(res["machine"]), "| flags:", res["flags"], flush=True)

    pre = Preprocess(height=HEIGHT, width=WIDTH)
    layers = synthetic_layers(pre, 3)  # 2 for the bank, 1 to score
    x = layers[2:3]
    net0 = patch.build_normal_net(2, pre, bank_size=BANKS[0], smooth_px=4.0, roi=None)
    feats_mod = net0.features
    with torch.inference_mode():
        bank_feats = feats_mod(torch.from_numpy(layers[:2]))
        query = feats_mod(torch.from_numpy(x))
    c = bank_feats.shape[1]
    pool = bank_feats.permute(0, 2, 3, 1).reshape(-1, c)
    pool = pool[torch.randperm(pool.shape[0])[: max(BANKS)]].contiguous()
    grid = tuple(query.shape[-2:])
    res["grid"], res["patches"] = list(grid), grid[0] * grid[1]
    print(f"feature map {c} x {grid}, {grid[0] * grid[1]} patches", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # 1. features alone and the whole scoring net per bank size (the code as it is)
        whole_paths = {"features": export(FeatureMap(feats_mod), torch.from_numpy(x), tmp / "f")}
        nets = {"features": FeatureMap(feats_mod)}
        for m in BANKS:
            net = patch.build_normal_net(
                2, pre, bank_size=m, smooth_px=4.0, roi=None, pixel_weight=PIXEL_WEIGHT
            )
            net.features = feats_mod
            net.scorer.set_bank(pool[:m])
            scoring = ScoringNet(net).eval()
            _torch_export(scoring, x, tmp / f"whole{m}.onnx", OPSET)
            whole_paths[f"whole_{m}"], nets[f"whole_{m}"] = tmp / f"whole{m}.onnx", scoring
            print(f"exported whole net, bank {m} ({time.perf_counter() - t0:.0f} s)", flush=True)
        scoring = residual_net(pre, layers[:2], RESIDUAL_BANK)
        _torch_export(scoring, x, tmp / "whole_residual.onnx", OPSET)
        whole_paths[RESIDUAL_KEY], nets[RESIDUAL_KEY] = tmp / "whole_residual.onnx", scoring

        # 2. the search alone, variants; input = the feature map
        q = query.numpy()
        exact = {}
        search = {}
        for m in (2048, 10000):
            bank = pool[:m]
            exact[m] = Chunked(bank, m)(query).numpy()
            variants = {
                f"chunk2048_{m}": Chunked(bank, 2048),  # as now
                f"chunk512_{m}": Chunked(bank, 512),
                f"chunkall_{m}": Chunked(bank, m),
                f"fused_{m}": Fused(bank, 2048),
                f"tiled1024x1024_{m}": Fused(bank, 1024, rows=1024),
                f"tiled2048x2048_{m}": Fused(bank, 2048, rows=2048),
                f"fp16tiled_{m}": Fused(bank, 1024, rows=1024, half=True),
                f"pca64tiled_{m}": Projected(bank, 64, 1024, rows=1024),
            }
            for name, mod in variants.items():
                search[name] = {"mod": mod.eval(), "m": m}
                search[name]["path"] = export(mod, query, tmp / f"{name}.onnx")
            print(f"exported search variants, bank {m} ({time.perf_counter() - t0:.0f} s)")

        # 3. time: onnxruntime, all graphs in one interleaved loop
        runs, errors = {}, {}
        for name, path in whole_paths.items():
            runs[name] = runner(session(path), x)
        runs["backbone"] = runs["features"]
        for name, s in search.items():
            try:
                sess = session(s["path"])
                out = sess.run(None, {"x": q})[0]
            except Exception as exc:  # noqa: BLE001 -- an op onnxruntime CPU lacks: say so
                errors[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
                print(f"{name}: onnxruntime CPU cannot run it: {errors[name]}", flush=True)
                continue
            ref = exact[s["m"]]
            rel = np.abs(out - ref) / np.maximum(ref, 1e-6)
            s["err_max"], s["err_mean"] = float(rel.max()), float(rel.mean())
            runs[name] = runner(sess, q)
        del runs["backbone"]
        print(f"timing {len(runs)} graphs x {args.repeats} ({time.perf_counter() - t0:.0f} s)")
        ms = interleave(runs, args.repeats)
        res["ort_ms"] = {k: med(v) for k, v in ms.items()}
        res["ort_ms_all"] = {k: [round(t, 2) for t in v] for k, v in ms.items()}
        if openvino_installed():  # after onnxruntime's loop: in one loop its threads slowed it
            ov_ms = interleave(openvino_runs(whole_paths, search, set(runs), x, q), args.repeats)
            res["ort_ms"].update({k: med(v) for k, v in ov_ms.items()})
        res["search"] = {
            k: {"bank": s["m"], "err_max": s.get("err_max"), "err_mean": s.get("err_mean")}
            for k, s in search.items()
        }
        res["errors"] = errors

        # 4. torch eager, for reference (fewer repeats)
        with torch.inference_mode():
            xt = torch.from_numpy(x)
            eager = {k: (lambda n=n: n(xt)) for k, n in nets.items()}
            ems = interleave(eager, args.eager_repeats)
        res["eager_ms"] = {k: med(v) for k, v in ems.items()}
    res["seconds"] = round(time.perf_counter() - t0)
    text = report(res)
    print(text)
    save_results(RESULTS, "normal_scoring", res)
    if not args.no_doc:
        update_section("normal_scoring", text)


def openvino_runs(whole: dict, search: dict, ok: set, x: np.ndarray, q: np.ndarray) -> dict:
    """``ov:<name>`` runners for the graphs onnxruntime could run (OpenVINO, ``THREADS``)."""
    from inspect3d.infer.openvino import OpenVinoSession

    graphs = {
        **{k: (p, x) for k, p in whole.items()},
        **{k: (s["path"], q) for k, s in search.items()},
    }
    return {f"ov:{k}": runner(OpenVinoSession(str(p), THREADS), inp)
            for k, (p, inp) in graphs.items() if k in ok}  # fmt: skip


def _flags() -> str:
    flags = cpu_flags()
    return " ".join(f for f in ("avx2", "avx512f", "avx512_vnni") if f in flags) or "none"


LABELS = {
    "chunk2048": "MemoryBank, BANK_CHUNK 2048 (now)",
    "chunk512": "MemoryBank, BANK_CHUNK 512",
    "chunkall": "MemoryBank, whole bank in one matmul",
    "fused": "-2 folded into the bank (MatMul + Add + min), chunks of 2048",
    "tiled1024x1024": "fused, tiles of 1024 patches x 1024 bank rows",
    "tiled2048x2048": "fused, tiles of 2048 patches x 2048 bank rows",
    "fp16tiled": "tiled 1024 x 1024, fp16 matmul",
    "pca64tiled": "tiled 1024 x 1024, search in PCA 64 dims, exact distance of the match",
}


def report(res: dict) -> str:
    o, e = res["ort_ms"], res["eager_ms"]
    line = machine_line(res["machine"])  # a string in results saved before it was a dict
    f = o["features"]
    lines = [
        "## Normal-only scoring at 1280×1024 (`benchmarks/speed/normal_scoring.py`)",
        "",
        f"Machine: {line}; CPU flags (avx2/avx512f/avx512_vnni): {res['flags']}. "
        f"onnxruntime CPU, {res['threads']} threads (`session_options(threads=2)`), batch 1, "
        f"medians of {res['repeats']} interleaved runs after a warm-up; torch eager medians of "
        f"fewer. Layer {res['width']}×{res['height']} grey, feature map 152 × "
        f"{res['grid'][0]} × {res['grid'][1]} = {res['patches']} patches; bank rows: features of "
        "synthetic good layers; real offline ImageNet Lite0 weights. Run took "
        f"{res['seconds']} s.",
        "",
        "Whole exported scoring net (the code as it is: `BANK_CHUNK` 2048) vs the feature "
        "extractor alone (goal: whole ≤ 2× features):",
        "",
        "| graph | onnxruntime ms | whole / features | torch eager ms | OpenVINO ms | "
        "OpenVINO whole / features | onnxruntime / OpenVINO |",
        "|---|---|---|---|---|---|---|",
        f"| features alone | {f:.0f} | 1.00 | {e['features']:.0f} | {_ov(o, 'features')} |",
    ]
    for m in BANKS:
        k = f"whole_{m}"
        lines.append(
            f"| whole, bank {m} | {o[k]:.0f} | **{o[k] / f:.2f}** | {e[k]:.0f} | {_ov(o, k)} |"
        )
    if RESIDUAL_KEY in o:
        k = RESIDUAL_KEY
        lines.append(
            f"| whole, bank {RESIDUAL_BANK}, `normal.residual=true` (pixel residual channels, "
            f"top-{patch.NEIGHBOURS} search) | {o[k]:.0f} | **{o[k] / f:.2f}** | {e[k]:.0f} | "
            f"{_ov(o, k)} |"
        )
    lines += [
        "",
        "Nearest-neighbour search alone (input: the feature map), variants, against the search "
        "as it runs now and against the backbone (goal: search ≤ backbone); error = max "
        "relative difference of the nearest-neighbour distance from the exact one, over all "
        "patches of a held-out layer:",
        "",
        "| bank | search variant | ms | vs now | search / backbone | max rel. error | "
        "OpenVINO ms | OpenVINO search / backbone | onnxruntime / OpenVINO |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in res["search"].items():
        kind, m = name.rsplit("_", 1)
        if name not in o:
            lines.append(f"| {m} | {LABELS[kind]} | — ({res['errors'][name][:80]}) | | | |")
            continue
        base = o[f"chunk2048_{m}"]
        lines.append(
            f"| {m} | {LABELS[kind]} | {o[name]:.0f} | {base / o[name]:.2f}× faster | "
            f"{o[name] / f:.2f} | {s['err_max']:.1e} | {_ov(o, name)} |"
        )
    ratio = {m: o[f"whole_{m}"] / f for m in BANKS}
    fits = [m for m in BANKS if ratio[m] <= 2.0]
    lines += [
        "",
        f"Reading it: with the search as it is, banks up to {max(fits) if fits else 'none'} "
        "keep scoring within 2× the features at 1280×1024 (the whole / features ratio grows "
        "about linearly with the bank). onnxruntime already folds the -2 into a FusedMatMul, "
        "and the chunk size barely matters: the matmul itself is most of the search time. "
        f"On this CPU ({res.get('flags') or 'flags unknown'}) an fp16 MatMul runs the bank-2048 "
        f"search {_faster(o, 'fp16tiled_2048')} and the PCA projection to 64 dims "
        f"{_faster(o, 'pca64tiled_2048')}, less than its FLOPs suggest (argmin and gathers), and "
        "its nearest neighbour is often not the exact one (error well above 1%).",
    ]
    if RESIDUAL_KEY in o:
        lines[-1] += (
            f" The `normal.residual=true` net costs {o[RESIDUAL_KEY] / f:.2f}× the features, "
            f"{o[RESIDUAL_KEY] / o[f'whole_{RESIDUAL_BANK}']:.2f}× the default net at the same "
            f"bank: its top-{patch.NEIGHBOURS} search keeps and gathers "
            f"{patch.NEIGHBOURS} neighbours per patch "
            "where the default keeps a running minimum (opt-in; over the goal's 2×)."
        )
    if "ov:features" in o:
        lines += [
            "",
            "OpenVINO columns: the same ONNX graphs on OpenVINO (2 threads), interleaved in a "
            "loop of their own after onnxruntime's (in one loop OpenVINO's threads slowed the "
            "onnxruntime calls after them); its search / backbone ratio is within its loop, "
            "onnxruntime / OpenVINO compares the two loops, so it carries the load of two "
            "moments on a shared machine (read it as a rough figure).",
        ]
    return "\n".join(lines)


def _faster(o: dict, name: str) -> str:
    """'1.16× as fast as the search now' for variant ``name``, or that it did not run."""
    if name not in o:
        return "(not run)"
    return f"{o['chunk2048_2048'] / o[name]:.2f}× as fast as the search now"


def _ov(o: dict, name: str) -> str:
    """OpenVINO columns: ms, its ratio to OpenVINO's features alone, onnxruntime / OpenVINO."""
    ms, base = o.get(f"ov:{name}"), o.get("ov:features")
    if ms is None or base is None:
        return "— | — | —"
    return f"{ms:.0f} | {ms / base:.2f} | {o[name] / ms:.2f}×"


if __name__ == "__main__":
    main()
