"""Self-describing checkpoints: weights + resolved config + classes + preprocessing.

Loadable with ``torch.load(path, weights_only=True)``: only tensors and plain Python values.
The one home of the checkpoint format and of rebuilding a checkpoint's network, shared by
supervised training (``inspect3d.train``) and normal-only fitting (``inspect3d.normal``).
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inspect3d import __version__
from inspect3d.data.preprocess import Preprocess
from inspect3d.errors import InspectError
from inspect3d.io import save_atomic
from inspect3d.models import TRAINING_KEYS, build_model

FORMAT = "inspect3d-checkpoint/1"
BUILDER = "inspect3d.models.build_model"
NORMAL_BUILDER = "inspect3d.normal.patch.build_normal_net"
# the builders a checkpoint's ``model._target_`` may name; a normal-only model's builder is
# found by its name when a checkpoint asks for it, as Hydra finds a ``_target_``, so this
# module (and ``train``) depends on no later stage
BUILDERS = (BUILDER, NORMAL_BUILDER)


def config_hash(config: dict) -> str:
    """Short stable hash of a resolved config (identifies the training recipe)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def model_from_config(model_cfg: dict, num_classes: int, pre: Preprocess) -> torch.nn.Module:
    """Build the network a ``configs/model/*.yaml`` node describes."""
    skip = ("_target_", "_partial_", *TRAINING_KEYS)
    kwargs = {k: v for k, v in model_cfg.items() if k not in skip}
    target = model_cfg.get("_target_", BUILDER)
    if target == BUILDER:
        return build_model(num_classes=num_classes, spec=pre, **kwargs)
    if target not in BUILDERS:
        raise InspectError(f"model._target_={target!r} is not supported: use {BUILDER!r}")
    # a normal-only model (inspect3d fit-normal) sees the whole preprocessing (its grid)
    return builder(target)(num_classes=num_classes, pre=pre, **kwargs)


def builder(target: str) -> Callable[..., torch.nn.Module]:
    """The function a dotted ``_target_`` names (one of ``BUILDERS``)."""
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def plain(value: Any) -> Any:
    """Only types ``weights_only`` loading accepts: numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(plain(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def save_checkpoint(path: Path, model: torch.nn.Module, meta: dict[str, Any], **extra: Any) -> Path:
    state = plain({"format": FORMAT, "inspect3d_version": __version__, **meta, **extra})
    state["state_dict"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save_atomic(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise InspectError(
            f"checkpoint not found: {str(path)!r} (a run folder holds checkpoint.pt)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InspectError(f"cannot read checkpoint {str(path)!r}: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise InspectError(
            f"{str(path)!r} is not an inspect3d checkpoint (format {FORMAT!r} expected); "
            "train one with `inspect3d train`"
        )
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> torch.nn.Module:
    pre = Preprocess.from_dict(ckpt["preprocess"])
    # the weights come from the checkpoint: never fetch ImageNet ones (no internet needed)
    model_cfg = {
        **ckpt["model"],
        **({"pretrained": False} if "pretrained" in ckpt["model"] else {}),
    }
    model = model_from_config(model_cfg, len(ckpt["classes"]), pre)
    load_weights(model, ckpt, ckpt["model"].get("name", "?"))
    return model.eval()


def load_weights(model: torch.nn.Module, ckpt: dict[str, Any], expected_name: str) -> None:
    """Load weights, turning a shape/key mismatch into an error that names both models."""
    found = ckpt.get("model", {}).get("name", "?")
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:3]
        raise InspectError(
            f"checkpoint holds model {found!r} with classes {ckpt.get('classes')}, which does not "
            f"fit the configured model {expected_name!r}: {' '.join(first).strip()}. Use the same "
            "model=... and data classes as the checkpoint, or start without trainer.resume"
        ) from exc
