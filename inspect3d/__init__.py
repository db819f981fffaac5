"""inspect3d: quality inspection of additive-manufacturing layer images.

Flow: data -> train -> export (ONNX) -> infer (onnxruntime) -> watch -> review.
The scoring path (``inspect3d.infer`` and ``inspect3d.data.preprocess``) imports no torch.
"""

__version__ = "0.1.0"
