"""Scoring with onnxruntime (no torch): ``OnnxModel.load(path).predict(layer)``."""

from inspect3d.infer.model import LayerScore, OnnxModel

__all__ = ["LayerScore", "OnnxModel"]
