"""``OnnxModel``: an exported model with its metadata, scoring layers with onnxruntime or
OpenVINO (see ``providers.choose_runtime``)."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from inspect3d.data.parts import cells_from_masks
from inspect3d.errors import InspectError
from inspect3d.infer.int8 import fp32_instead
from inspect3d.infer.metadata import INPUT_NAME, PARTS_INPUT, ModelMeta
from inspect3d.infer.providers import (
    GPU_PROVIDERS,
    OPENVINO,
    check_active,
    choose_runtime,
    resolve_providers,
)

log = logging.getLogger(__name__)


@dataclass
class LayerScore:
    """The verdict on one layer."""

    label: str  # arg-max over all classes (may be the normal class on a flagged layer)
    probs: dict[str, float]
    defect_score: float
    decision: str  # "defect" when defect_score >= threshold, else "ok"
    threshold: float
    defect_map: np.ndarray = field(repr=False)  # (h, w) float32, threshold at map_threshold
    path: str | None = None
    defect_class: str = ""  # the most likely defect class: arg-max over all but the normal one
    defect_prob: float = 0.0  # its probability
    map_threshold: float | None = None  # where the defect map crosses the threshold

    @property
    def shown_class(self) -> tuple[str, float]:
        """(class, probability) to name: the likeliest defect class when flagged, else the label."""
        if self.decision == "defect" and self.defect_class:
            return self.defect_class, self.defect_prob
        return self.label, self.probs.get(self.label, 0.0)

    def to_dict(self) -> dict:
        """JSON-ready; the defect map is summarised by its peak and where it is (x, y in 0..1)."""
        h, w = self.defect_map.shape
        y, x = np.unravel_index(int(self.defect_map.argmax()), self.defect_map.shape)
        return {
            "path": self.path,
            "label": self.label,
            "probs": {k: round(v, 6) for k, v in self.probs.items()},
            "defect_score": round(self.defect_score, 6),
            "decision": self.decision,
            "threshold": round(self.threshold, 6),
            "defect_class": self.defect_class,
            "defect_prob": round(self.defect_prob, 6),
            "defect_map_peak": round(float(self.defect_map.max()), 6),
            "defect_map_peak_xy": [round((x + 0.5) / w, 4), round((y + 0.5) / h, 4)],
        }


def likeliest_defect(probs: dict[str, float], normal_class: str) -> tuple[str, float]:
    """The arg-max over the defect classes (all but ``normal_class``): (class, p), or ("", 0)."""
    defects = {c: p for c, p in probs.items() if c != normal_class}
    if not defects:
        return "", 0.0
    name = max(defects, key=defects.__getitem__)
    return name, float(defects[name])


def session_options(threads: int = 0, spinning: bool = True) -> ort.SessionOptions:
    """onnxruntime options, set deliberately rather than left to defaults.

    - ``threads``: intra-op threads; 0 = one per physical core (onnxruntime's choice), the
      fastest for one model per machine. Give fewer when the PC does other work.
    - one inter-op thread and sequential execution: a CNN is a chain of ops, parallel branches
      would only compete with the intra-op threads.
    - full graph optimisation (conv+BN+activation fusion, layout changes), the CPU memory
      arena and memory patterns on: buffers are planned once and reused for every batch.
    - ``spinning``: worker threads spin between ops (lower latency). The watcher turns it off so
      an idle watcher does not keep cores busy between layers.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.enable_cpu_mem_arena = True
    opts.enable_mem_pattern = True
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return opts


def open_session(
    path: Path, provider: str, threads: int = 0, spinning: bool = True, parity: bool = True
):
    """An onnxruntime session, or for OpenVINO one that behaves like it (``OpenVinoSession``:
    with ``parity``, its first real batch is checked against onnxruntime's CPU provider; chosen
    by ``auto``, it falls back to that provider if the check fails)."""
    if choose_runtime(provider) == OPENVINO:
        from inspect3d.infer.openvino import OpenVinoSession  # the optional extra

        reference = (lambda: open_session(path, "cpu", threads)) if parity else None
        return OpenVinoSession(str(path), threads, reference, fallback=provider == "auto")
    opts = session_options(threads, spinning)
    try:
        return ort.InferenceSession(str(path), opts, providers=resolve_providers(provider))
    except Exception as exc:  # onnxruntime's own error types (InvalidProtobuf, Fail, ...)
        raise InspectError(f"onnxruntime cannot load {str(path)!r}: {exc}") from exc


class OnnxModel:
    """Load once, then ``predict`` layers (arrays or paths) in batches."""

    def __init__(self, session: ort.InferenceSession, meta: ModelMeta, path: str) -> None:
        self.session, self.meta, self.path = session, meta, path
        self.pre = meta.preprocess
        self.threshold = meta.threshold
        self.output_names = [o.name for o in session.get_outputs()]
        # normal-only models fitted with part masks take the layer's part cells as well
        inputs = {i.name: i for i in session.get_inputs()}
        self.part_grid = tuple(inputs[PARTS_INPUT].shape[2:]) if PARTS_INPUT in inputs else None
        # On a GPU, I/O binding hands onnxruntime the uint8 batch and host output buffers
        # directly: one upload of 1 byte/pixel, normalisation on the device, no staging copies.
        self.io_binding = any(p in GPU_PROVIDERS for p in session.get_providers())

    @classmethod
    def load(
        cls,
        path: str | Path,
        provider: str = "auto",
        threshold: float | None = None,
        threads: int = 0,
        spinning: bool = True,
    ) -> OnnxModel:
        """The model at ``path`` on ``provider`` (see ``providers``); an int8 model only where it
        pays, else the fp32 model beside it (see ``infer.int8``): ``path`` says which scores."""
        model = cls._open(Path(path), provider, threads, spinning)
        if not model.io_binding:  # a CPU: int8 only where it was measured to pay
            fp32 = fp32_instead(model.meta, Path(path), choose_runtime(provider))
            model = model if fp32 is None else cls._open(fp32, provider, threads, spinning)
        if threshold is not None:
            model.threshold = float(threshold)
        log.info("%s scores with %s", Path(model.path).name, model.runtime)
        return model

    @classmethod
    def _open(cls, path: Path, provider: str, threads: int, spinning: bool) -> OnnxModel:
        if not path.is_file():
            raise InspectError(f"model file not found: {str(path)!r} (made by `inspect3d export`)")
        session = open_session(path, provider, threads, spinning)
        check_active(session, provider)
        props = session.get_modelmeta().custom_metadata_map
        return cls(session, ModelMeta.from_props(props, repr(str(path))), str(path))

    @property
    def runtime(self) -> str:
        """Which runtime and provider score, e.g. "onnxruntime CPUExecutionProvider"."""
        first = self.providers[0]
        return first if first.startswith("OpenVINO") else f"onnxruntime {first}"

    @property
    def map_threshold(self) -> float:
        """The defect map's value at the threshold: metadata "map_threshold", else ``threshold``.

        Supervised maps are 1 - P(normal) in [0, 1] and cross at the model threshold; normal-only
        maps may be in units of the calibrated threshold (1.0 = threshold, unbounded above).
        """
        raw = self._map_threshold_meta
        return raw if raw is not None else self.threshold

    @functools.cached_property
    def _map_threshold_meta(self) -> float | None:
        raw = self.session.get_modelmeta().custom_metadata_map.get("map_threshold")
        return None if raw is None else float(raw)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def run(
        self, batch: np.ndarray, part_cells: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raw outputs for a preprocessed uint8 batch (N, C, H, W): probs, defect maps.
        ``part_cells`` (N, 1, h, w): for a model with a part input (see ``cells_of``)."""
        feeds = {INPUT_NAME: batch}
        if self.part_grid is not None:
            feeds[PARTS_INPUT] = (
                np.zeros((len(batch), 1, *self.part_grid), np.float32)
                if part_cells is None
                else np.ascontiguousarray(part_cells, dtype=np.float32)
            )
        if self.io_binding:
            return self._run_bound(feeds)
        probs, maps = self.session.run(None, feeds)
        return probs, maps

    def cells_of(self, masks: list[np.ndarray | str | Path | None]) -> np.ndarray | None:
        """Part cells (N, 1, h, w) of the model's map grid from part masks (bool arrays at the
        layer's size, or mask files; None: no mask for that layer). None for models without a
        part input."""
        if self.part_grid is None:
            return None
        return cells_from_masks(masks, self.part_grid)

    def _run_bound(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        probs, maps = binding.copy_outputs_to_cpu()
        return probs, maps

    def predict(
        self, layer: np.ndarray | str | Path, parts: np.ndarray | str | Path | None = None
    ) -> LayerScore:
        """Score one layer: a decoded image (H, W[, 3]) or an image file path; ``parts``: its
        part mask (array or file, white = part), used by models fitted with part masks."""
        return self.predict_batch([layer], None if parts is None else [parts])[0]

    def predict_batch(
        self, layers: list[np.ndarray | str | Path], parts: list | None = None
    ) -> list[LayerScore]:
        batch = np.stack([self._prepare(x) for x in layers])
        cells = None if parts is None else self.cells_of(parts)
        return self.score_inputs(
            batch, [str(x) if isinstance(x, str | Path) else None for x in layers], cells
        )

    def score_inputs(
        self,
        batch: np.ndarray,
        paths: list[str | None] | None = None,
        part_cells: np.ndarray | None = None,
    ) -> list[LayerScore]:
        """Scores for model inputs already preprocessed (uint8 (N, C, H, W), see ``pre``)."""
        probs, maps = self.run(batch, part_cells)
        paths = paths or [None] * len(batch)
        return [self._score(p, m[0], path) for p, m, path in zip(probs, maps, paths, strict=True)]

    def predict_files(
        self,
        paths: Iterable[str | Path],
        batch_size: int = 8,
        workers: int | None = None,
        parts_dir: Path | None = None,
    ) -> Iterator[tuple[Path, LayerScore | InspectError]]:
        """Score files in batches, decoding the next batch while onnxruntime runs this one.

        OpenCV's decoder and onnxruntime both release the GIL, so threads overlap them. A file
        that cannot be read yields its error in place of a score; the others still count.
        ``parts_dir``: part masks named like the layers, for a model with a part input.
        """
        batches = chunks([Path(p) for p in paths], max(1, batch_size))
        workers = workers or min(4, os.cpu_count() or 1)
        with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:

            def start(batch: list[Path]) -> list[Future]:
                return [pool.submit(self.pre.load, p) for p in batch]

            for batch, decoded in started_ahead(batches, start):
                yield from self._score_decoded(batch, decoded, parts_dir)

    def _score_decoded(
        self, paths: list[Path], decoded: list[Future], parts_dir: Path | None = None
    ) -> Iterator[tuple[Path, LayerScore | InspectError]]:
        good, out = [], {}
        for path, future in zip(paths, decoded, strict=True):
            try:
                good.append((path, future.result()))
            except InspectError as exc:
                out[path] = exc
        if good:
            cells = self._cells_for([p for p, _ in good], parts_dir)
            batch = np.stack([x for _, x in good])
            scores = self.score_inputs(batch, [str(p) for p, _ in good], cells)
            out.update({path: score for (path, _), score in zip(good, scores, strict=True)})
        for path in paths:
            yield path, out[path]

    def _cells_for(self, paths: list[Path], folder: Path | None) -> np.ndarray | None:
        if folder is None or self.part_grid is None:
            return None
        return self.cells_of([m if (m := folder / p.name).is_file() else None for p in paths])

    def _prepare(self, layer: np.ndarray | str | Path) -> np.ndarray:
        return self.pre.load(layer) if isinstance(layer, str | Path) else self.pre(layer)

    def _score(self, probs: np.ndarray, defect_map: np.ndarray, path: str | None) -> LayerScore:
        classes = self.meta.classes
        defect_score = float(1.0 - probs[self.meta.normal_index])
        named = {c: float(v) for c, v in zip(classes, probs, strict=True)}
        defect_class, defect_prob = likeliest_defect(named, self.meta.normal_class)
        return LayerScore(
            label=classes[int(probs.argmax())],
            probs=named,
            defect_score=defect_score,
            decision="defect" if defect_score >= self.threshold else "ok",
            threshold=self.threshold,
            defect_map=defect_map.astype(np.float32),
            path=path,
            defect_class=defect_class,
            defect_prob=defect_prob,
            map_threshold=self.map_threshold,
        )


def chunks(items: list, size: int) -> Iterator[list]:
    """``items`` in consecutive lists of ``size`` (the last one shorter)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def started_ahead(
    batches: Iterable[list], start: Callable[[list], list[Future]]
) -> Iterator[tuple[list, list[Future]]]:
    """(batch, its futures) for each batch, the next batch already started (``start``: submit
    its work, e.g. decoding, to threads) while the caller handles this one. Closing the
    generator early (``contextlib.closing`` around a loop that may ``break``) cancels the work
    started for the next batch and waits for what of it had begun."""
    ahead: tuple[list, list[Future]] | None = None  # started, not yet handed out
    try:
        for batch in batches:
            previous, ahead = ahead, (batch, start(batch))
            if previous is not None:
                yield previous
        if ahead is not None:
            last, ahead = ahead, None
            yield last
    finally:
        begun = [f for f in (ahead[1] if ahead is not None else []) if not f.cancel()]
        wait(begun)  # what of it had begun is over when the generator closes
