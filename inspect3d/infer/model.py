"""``OnnxModel``: an exported model with its metadata, scoring layers with onnxruntime."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from inspect3d.errors import InspectError
from inspect3d.infer.metadata import INPUT_NAME, ModelMeta
from inspect3d.infer.providers import check_active, resolve_providers


@dataclass
class LayerScore:
    """The verdict on one layer."""

    label: str
    probs: dict[str, float]
    defect_score: float
    decision: str  # "defect" when defect_score >= threshold, else "ok"
    threshold: float
    defect_map: np.ndarray = field(repr=False)  # (h, w) float32 in [0, 1]
    path: str | None = None

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
            "defect_map_peak": round(float(self.defect_map.max()), 6),
            "defect_map_peak_xy": [round((x + 0.5) / w, 4), round((y + 0.5) / h, 4)],
        }


class OnnxModel:
    """Load once, then ``predict`` layers (arrays or paths) in batches."""

    def __init__(self, session: ort.InferenceSession, meta: ModelMeta, path: str) -> None:
        self.session, self.meta, self.path = session, meta, path
        self.pre = meta.preprocess
        self.threshold = meta.threshold

    @classmethod
    def load(
        cls,
        path: str | Path,
        provider: str = "auto",
        threshold: float | None = None,
        threads: int = 0,
    ) -> OnnxModel:
        path = Path(path)
        if not path.is_file():
            raise InspectError(f"model file not found: {str(path)!r} (made by `inspect3d export`)")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads  # 0: onnxruntime uses every physical core
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            session = ort.InferenceSession(str(path), opts, providers=resolve_providers(provider))
        except Exception as exc:  # onnxruntime's own error types (InvalidProtobuf, Fail, ...)
            raise InspectError(f"onnxruntime cannot load {str(path)!r}: {exc}") from exc
        check_active(session, provider)
        props = session.get_modelmeta().custom_metadata_map
        model = cls(session, ModelMeta.from_props(props, repr(str(path))), str(path))
        if threshold is not None:
            model.threshold = float(threshold)
        return model

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw outputs for a preprocessed uint8 batch (N, C, H, W): probs, defect maps."""
        probs, maps = self.session.run(None, {INPUT_NAME: batch})
        return probs, maps

    def predict(self, layer: np.ndarray | str | Path) -> LayerScore:
        """Score one layer: a decoded image (H, W[, 3]) or an image file path."""
        return self.predict_batch([layer])[0]

    def predict_batch(self, layers: list[np.ndarray | str | Path]) -> list[LayerScore]:
        batch = np.stack([self._prepare(x) for x in layers])
        probs, maps = self.run(batch)
        paths = [str(x) if isinstance(x, str | Path) else None for x in layers]
        return [self._score(p, m[0], path) for p, m, path in zip(probs, maps, paths, strict=True)]

    def _prepare(self, layer: np.ndarray | str | Path) -> np.ndarray:
        return self.pre.load(layer) if isinstance(layer, str | Path) else self.pre(layer)

    def _score(self, probs: np.ndarray, defect_map: np.ndarray, path: str | None) -> LayerScore:
        classes = self.meta.classes
        defect_score = float(1.0 - probs[self.meta.normal_index])
        return LayerScore(
            label=classes[int(probs.argmax())],
            probs={c: float(v) for c, v in zip(classes, probs, strict=True)},
            defect_score=defect_score,
            decision="defect" if defect_score >= self.threshold else "ok",
            threshold=self.threshold,
            defect_map=defect_map.astype(np.float32),
            path=path,
        )
