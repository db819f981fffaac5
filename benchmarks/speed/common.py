"""Shared pieces of the speed benchmarks: timing, the docs section, FLOPs, kernel profiles.

Rules (shared/GUIDE.md §6): variants are measured in the same run, interleaved, and compared
as ratios of medians; the machine (and its load) is printed with every result. The machine,
the results file, the section writer and pyplot are ``benchmarks/support.py``'s.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for support.py
# the scripts use these as common's: one definition each, in support.py
from support import load_results, machine, machine_line, pyplot, save_results, write_section  # noqa: E402, F401

DOC = Path(__file__).resolve().parents[2] / "docs" / "speed.md"
RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Milliseconds per call, ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, rounds: int = 3):
    """{name: [ms...]}: rounds of each variant in turn, so drifting load hits all alike."""
    out: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            out[name] += timed(fn, max(1, repeats // rounds))
    return out


def med(values: list[float]) -> float:
    return statistics.median(values)


def update_section(name: str, text: str, doc: Path = DOC) -> Path:
    """Replace the ``<!-- name:begin -->``..``<!-- name:end -->`` block of ``doc`` (or append)."""
    return write_section(doc, f"<!-- {name}:begin -->", f"<!-- {name}:end -->", text, "# Speed")


def per_int8_class(name: str) -> str:
    """``name`` on a CPU without VNNI/AMX, else ``name_vnni`` / ``name_amx``: int8 figures of
    each CPU class keep a section (and results file) of their own."""
    from inspect3d.infer.cpu import int8_class

    cls = int8_class()
    return name if cls == "none" else f"{name}_{cls}"


def publish(name: str, text: str, results: dict, doc: bool = True) -> None:
    """Print ``text``, keep ``results`` in results/<name>.json and, with ``doc``, write ``text``
    as the ``name`` section of docs/speed.md."""
    print(text)
    save_results(RESULTS, name, results)
    if doc:
        update_section(name, text)


def conv_flops(path: str | Path, batch: int = 1) -> tuple[float, float]:
    """(FLOPs, bytes of conv inputs + outputs) of one forward pass, from the ONNX graph.

    Counts Conv (2 * N * Cout * Ho * Wo * Cin/groups * kh * kw), Gemm and MatMul: the work a
    CNN spends its time on. Elementwise ops are left out (they are memory traffic, not FLOPs).
    """
    model = onnx.shape_inference.infer_shapes(_fixed_batch(onnx.load(str(path)), batch))
    shapes = {v.name: _dims(v) for v in (*model.graph.value_info, *model.graph.input,
                                         *model.graph.output)}  # fmt: skip
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    flops = traffic = 0.0
    for node in model.graph.node:
        if node.op_type == "Conv":
            (n, cout, ho, wo), w = shapes[node.output[0]], shapes[node.input[1]]
            flops += 2.0 * n * cout * ho * wo * float(np.prod(w[1:]))
            traffic += 4.0 * (np.prod(shapes[node.input[0]]) + n * cout * ho * wo)
        elif node.op_type in ("Gemm", "MatMul"):
            a, out = shapes[node.input[0]], shapes[node.output[0]]
            flops += 2.0 * float(np.prod(out)) * a[-1]
    return flops, traffic


def _fixed_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    for value in (*model.graph.input, *model.graph.output):
        dim = value.type.tensor_type.shape.dim
        if dim and not dim[0].dim_value:
            dim[0].dim_value = batch
    return model


def _dims(value) -> list[int]:
    return [d.dim_value for d in value.type.tensor_type.shape.dim]


def sgemm_peak(n: int = 1024, threads: int = 0, repeats: int = 10) -> float:
    """GFLOP/s of onnxruntime's own fp32 MatMul (the MLAS kernels its convs use), n x n x n."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "sgemm",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ab"],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    ms = med(timed(lambda: sess.run(None, {"a": a, "b": a}), repeats, warmup=2))
    return 2.0 * n**3 / (ms * 1e-3) / 1e9


def op_profile(path: str | Path, x: np.ndarray, runs: int = 10) -> dict[str, float]:
    """{op type: share of kernel time} from onnxruntime's own profiler (CPU provider)."""
    import json
    import tempfile

    opts = ort.SessionOptions()
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = str(Path(tmp) / "prof")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        for _ in range(runs):
            sess.run(None, {name: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    totals: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            totals[op] = totals.get(op, 0.0) + float(e.get("dur", 0))
    all_time = sum(totals.values()) or 1.0
    return dict(sorted(((k, v / all_time) for k, v in totals.items()), key=lambda kv: -kv[1]))
