"""What an exported model carries in its ONNX ``metadata_props``: all a scorer needs.

Written by ``inspect3d.export`` and read by ``inspect3d.infer`` (so this module imports neither
torch nor onnx). Values are strings; structured ones are JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from inspect3d.data.preprocess import Preprocess
from inspect3d.errors import InspectError

FORMAT = "inspect3d-onnx/1"
INPUT_NAME = "layers"
# second input of normal-only models fitted with part masks: part cells (N, 1, h, w), 1 = part
PARTS_INPUT = "part_cells"
OUTPUT_NAMES = ("probs", "defect_map")
_JSON_KEYS = (
    "classes", "preprocess", "metrics", "input", "outputs", "calibration", "roi", "int8_speed",
)  # fmt: skip
MODES = ("supervised", "normal_only")


@dataclass
class ModelMeta:
    classes: list[str]
    normal_class: str
    preprocess: Preprocess
    threshold: float
    target_frr: float = 0.05
    model_name: str = ""
    config_hash: str = ""
    inspect3d_version: str = ""
    metrics: dict = field(default_factory=dict)
    quantization: str = "none"
    defect_map_stride: int = 16
    # optional, added with normal-only models; older files read as supervised / {}
    mode: str = "supervised"  # supervised | normal_only (fitted on good layers only)
    calibration: dict = field(default_factory=dict)  # expected_frr, frr_ci95, n_calibration...
    # the defect-map value that means "at the threshold": None = ``threshold`` (a supervised
    # map in [0, 1]); 1.0 for normal-only maps, which are in units of the threshold
    map_threshold: float | None = None
    # region of interest, a polygon in fractions of the layer ([[x, y], ...]); None = all
    roi: list | None = None
    # int8 models: int8 / fp32 speed measured where they were made (see ``infer.int8``)
    int8_speed: dict = field(default_factory=dict)

    @property
    def normal_index(self) -> int:
        return self.classes.index(self.normal_class)

    def to_props(self) -> dict[str, str]:
        h, w, c = self.preprocess.height, self.preprocess.width, self.preprocess.channels
        props = {
            "format": FORMAT,
            "classes": self.classes,
            "normal_class": self.normal_class,
            "preprocess": self.preprocess.to_dict(),
            "threshold": repr(float(self.threshold)),
            "target_frr": repr(float(self.target_frr)),
            "model_name": self.model_name,
            "config_hash": self.config_hash,
            "inspect3d_version": self.inspect3d_version,
            "metrics": self.metrics,
            "quantization": self.quantization,
            "defect_map_stride": str(self.defect_map_stride),
            "mode": self.mode,
            "calibration": self.calibration,
            "roi": self.roi,
            "input": {
                "name": INPUT_NAME,
                "dtype": "uint8",
                "shape": ["batch", c, h, w],
                "pixels": "grey" if c == 1 else "RGB",
                "resize": "full layer, no crop",
            },
            "outputs": {
                "probs": ["batch", len(self.classes)],
                "defect_map": ["batch", 1, "h/stride", "w/stride"],
            },
        }
        if self.int8_speed:
            props["int8_speed"] = self.int8_speed
        if self.map_threshold is not None:
            props["map_threshold"] = repr(float(self.map_threshold))
        return {k: json.dumps(v) if k in _JSON_KEYS else str(v) for k, v in props.items()}

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "model") -> ModelMeta:
        if props.get("format") != FORMAT:
            raise InspectError(
                f"{source} has no inspect3d metadata (format {FORMAT!r} expected, found "
                f"{props.get('format')!r}); export it with `inspect3d export run=RUN`"
            )
        try:
            return cls(
                classes=json.loads(props["classes"]),
                normal_class=props["normal_class"],
                preprocess=Preprocess.from_dict(json.loads(props["preprocess"])),
                threshold=float(props["threshold"]),
                target_frr=float(props.get("target_frr", "0.05")),
                model_name=props.get("model_name", ""),
                config_hash=props.get("config_hash", ""),
                inspect3d_version=props.get("inspect3d_version", ""),
                metrics=json.loads(props.get("metrics", "{}")),
                quantization=props.get("quantization", "none"),
                defect_map_stride=int(props.get("defect_map_stride", "16")),
                mode=props.get("mode", "supervised"),
                calibration=json.loads(props.get("calibration", "{}")),
                map_threshold=_float_or_none(props.get("map_threshold")),
                roi=json.loads(props.get("roi", "null")),
                int8_speed=json.loads(props.get("int8_speed", "{}")),
            )
        except (KeyError, ValueError) as exc:
            raise InspectError(f"{source} has damaged inspect3d metadata: {exc!r}") from exc


def _float_or_none(value: str | None) -> float | None:
    return None if value in (None, "", "None") else float(value)
