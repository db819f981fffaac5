"""Settings of the watcher, checked when it starts (plain dataclasses: no Hydra needed)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from inspect3d.data.layout import DEFAULT_INBOX_PATTERN
from inspect3d.errors import InspectError
from inspect3d.watch.policy import PolicyConfig


@dataclass(frozen=True)
class ActionConfig:
    """What to do on a decision: a command (argv, no shell) and/or a webhook POST."""

    command: list[str] | None = None  # e.g. ["/usr/local/bin/pause-printer", "--now"]
    webhook: str | None = None  # e.g. http://mes.local/api/inspect3d
    levels: tuple[str, ...] = ("REJECT",)  # decisions that trigger: WARN, REJECT, FINAL_REJECT...
    timeout_s: float = 5.0
    retries: int = 2
    backoff_s: float = 0.5


@dataclass(frozen=True)
class WatchConfig:
    """Everything ``inspect3d watch`` needs; see configs/watch.yaml for the meaning of each."""

    model: str
    inbox: str
    state: str
    pattern: str = DEFAULT_INBOX_PATTERN
    marker: str = "JOB_END"
    poll_s: float = 0.25
    settle_s: float = 0.5
    idle_s: float = 900.0
    batch_size: int = 16
    max_pixels: int = 100_000_000
    max_image_bytes: int = 48_000_000  # decoded bytes (and file bytes) of one layer image
    incomplete_s: float = 30.0  # an incomplete file unchanged this long is recorded as failed
    incomplete_tries: int = 5  # looks at a file that keeps being incomplete before failing it
    provider: str = "auto"
    threads: int = 0
    until_idle: bool = False  # exit once the inbox is drained (demo, tests); else run forever
    review: bool = True
    log_max_bytes: int = 10_000_000
    log_backups: int = 5
    db: str | None = field(default=None, repr=False)  # postgresql://... (None: SQLite in state)
    cell: str | None = None  # this watcher's cell in a plant database (needed with db)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    actions: ActionConfig = field(default_factory=ActionConfig)

    def __post_init__(self) -> None:
        for name in ("poll_s", "settle_s", "idle_s", "incomplete_s"):
            if getattr(self, name) < 0:
                raise InspectError(f"{name}={getattr(self, name)!r} must be >= 0 (seconds)")
        if self.db is not None and not self.cell:
            raise InspectError(
                "db= (a plant database) needs cell=NAME: the name of this watcher's cell of "
                "printers, unique in the plant (e.g. cell=hall2-east)"
            )
        for name in ("batch_size", "max_pixels", "max_image_bytes", "incomplete_tries"):
            if getattr(self, name) < 1:
                raise InspectError(f"{name}={getattr(self, name)!r} must be >= 1")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WatchConfig:
        """Build from a plain mapping (e.g. a resolved Hydra config); unknown keys are errors."""
        d = dict(d)
        d["policy"] = _build(PolicyConfig, d.get("policy") or {}, "policy")
        acts = dict(d.get("actions") or {})
        if isinstance(acts.get("command"), str):
            acts["command"] = [acts["command"]]
        if "levels" in acts:
            acts["levels"] = tuple(acts["levels"])
        d["actions"] = _build(ActionConfig, acts, "actions")
        return _build(cls, d, "watch")


def _build(kind: type, d: dict[str, Any], where: str):
    valid = {f.name for f in fields(kind)}
    unknown = sorted(set(d) - valid)
    if unknown:
        raise InspectError(f"unknown {where} setting(s) {unknown}: valid are {sorted(valid)}")
    try:
        return kind(**d)
    except TypeError as exc:
        raise InspectError(f"{where} settings: {exc}") from exc
