"""inspect3d: quality inspection of additive-manufacturing layer images.

Flow: data -> train -> export (ONNX) -> infer (onnxruntime) -> watch -> review.
The scoring path (``inspect3d.infer`` and ``inspect3d.data.preprocess``) imports no torch.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("inspect3d")  # one definition: pyproject.toml's version
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
