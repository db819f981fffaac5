"""The checkpoint format under its earlier name: its home is ``inspect3d.models.checkpoint``."""

from inspect3d.models.checkpoint import (
    BUILDER,
    FORMAT,
    NORMAL_BUILDER,
    config_hash,
    load_checkpoint,
    load_weights,
    model_from_checkpoint,
    model_from_config,
    plain,
    save_checkpoint,
)

__all__ = [
    "BUILDER",
    "FORMAT",
    "NORMAL_BUILDER",
    "config_hash",
    "load_checkpoint",
    "load_weights",
    "model_from_checkpoint",
    "model_from_config",
    "plain",
    "save_checkpoint",
]
