"""The fast scoring path: session options, I/O binding, decode overlapped with inference."""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort

from inspect3d.errors import InspectError
from inspect3d.infer.model import OnnxModel, chunks, session_options, started_ahead
from inspect3d.infer.providers import TENSORRT_OPTIONS, resolve_providers


def test_session_options_are_set_deliberately():
    opts = session_options(threads=3, spinning=False)
    assert opts.intra_op_num_threads == 3 and opts.inter_op_num_threads == 1
    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert opts.enable_cpu_mem_arena and opts.enable_mem_pattern
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_cpu_only_onnxruntime_gets_the_cpu_provider_and_no_binding(exported):
    if set(ort.get_available_providers()) == {"CPUExecutionProvider"}:
        assert resolve_providers("auto") == ["CPUExecutionProvider"]
    assert TENSORRT_OPTIONS["trt_fp16_enable"]
    model = OnnxModel.load(exported, provider="cpu")
    assert model.io_binding is False


def test_io_binding_gives_the_same_outputs(exported, synth_dir):
    model = OnnxModel.load(exported, provider="cpu")
    paths = sorted(synth_dir.rglob("*.png"))[:3]
    batch = np.stack([model.pre.load(p) for p in paths])
    plain = model.run(batch)
    model.io_binding = True  # the path a GPU session takes, run here on the CPU provider
    bound = model.run(batch)
    for a, b in zip(plain, bound, strict=True):
        np.testing.assert_array_equal(a, b)


def test_predict_files_keeps_order_reports_bad_files_and_matches_batches(exported, synth_dir):
    model = OnnxModel.load(exported, provider="cpu")
    paths = sorted(synth_dir.rglob("*.png"))[:7]
    bad = synth_dir.parent / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    files = [*paths[:3], bad, *paths[3:]]
    out = list(model.predict_files(files, batch_size=3, workers=2))
    assert [p for p, _ in out] == files
    assert isinstance(out[3][1], InspectError) and "broken.png" in str(out[3][1])
    direct = model.predict_batch(paths)
    scores = [r for _, r in out if not isinstance(r, InspectError)]
    for got, want in zip(scores, direct, strict=True):
        assert got.label == want.label and got.path == want.path
        assert abs(got.defect_score - want.defect_score) < 1e-6


def test_the_next_batch_is_started_ahead_and_cancelled_when_the_caller_stops():
    gate, started = threading.Event(), []
    with ThreadPoolExecutor(1) as pool:

        def start(batch: list[int]) -> list:
            started.append((batch, [pool.submit(gate.wait) for _ in batch]))
            return started[-1][1]

        handed = []
        with contextlib.closing(started_ahead(chunks(list(range(7)), 3), start)) as ahead:
            for batch, _ in ahead:
                handed.append(batch)
                assert len(started) == len(handed) + 1  # the next batch is already under way
                break
        gate.set()
    assert handed == [[0, 1, 2]] and [b for b, _ in started] == [[0, 1, 2], [3, 4, 5]]
    assert all(f.cancelled() for f in started[1][1])  # queued behind the gate: never ran
    assert not any(f.cancelled() for f in started[0][1])  # the batch handed out ran
    every = [b for b, _ in started_ahead(chunks(list(range(7)), 3), lambda b: [])]
    assert every == [[0, 1, 2], [3, 4, 5], [6]]


def test_closing_waits_for_the_next_batch_where_it_has_begun():
    # the watcher scores the next batch on a thread: its model must be free when a step ends
    gate = threading.Event()
    with ThreadPoolExecutor(4) as pool:
        started = []

        def start(batch: list[int]) -> list:
            started.append([pool.submit(gate.wait) for _ in batch])
            return started[-1]

        with contextlib.closing(started_ahead(chunks(list(range(4)), 2), start)) as ahead:
            for _ in ahead:
                gate_opener = threading.Timer(0.2, gate.set)
                gate_opener.start()  # the next batch is running; closing must wait for it
                break
        assert all(f.done() and not f.cancelled() for f in started[1])
        gate_opener.join()
