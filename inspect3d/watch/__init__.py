"""The watcher: score print jobs as their layers land, decide per job, record (no torch)."""

from inspect3d.watch.config import ActionConfig, WatchConfig
from inspect3d.watch.policy import LayerObs, PolicyConfig, replay, step
from inspect3d.watch.service import Watcher, watch

__all__ = [
    "ActionConfig",
    "LayerObs",
    "PolicyConfig",
    "WatchConfig",
    "Watcher",
    "replay",
    "step",
    "watch",
]
