"""The per-job decision policy: pure functions of a job's layer scores, replayable anywhere.

A job's layers are fed in the order the watcher scored them. After each layer the policy says
whether the job escalates: OK -> WARN -> REJECT (never back down). Rules:

- REJECT when ``k`` of the last ``n`` counted layers have ``score >= threshold``, or when the
  exponentially weighted score (``ewma_alpha``) reaches ``ewma_level``;
- WARN when ``warn_k`` of the last ``n`` counted layers are over the threshold;
- the first ``ignore_first`` layers of a job (by layer number) are not counted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace

from inspect3d.errors import InspectError

POLICY_VERSION = "kofn-ewma/1"
LEVELS = ("OK", "WARN", "REJECT")


@dataclass(frozen=True)
class PolicyConfig:
    """Settings of the policy; ``threshold`` None means the model's own threshold."""

    k: int = 3
    n: int = 5
    warn_k: int = 1
    ewma_alpha: float = 0.3
    ewma_level: float | None = None  # None: the EWMA rule is off
    ignore_first: int = 0
    threshold: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.n:
            raise InspectError(f"policy k={self.k!r}, n={self.n!r}: need 1 <= k <= n")
        if not 1 <= self.warn_k <= self.k:
            raise InspectError(f"policy warn_k={self.warn_k!r}: need 1 <= warn_k <= k={self.k}")
        if not 0.0 < self.ewma_alpha <= 1.0:
            raise InspectError(f"policy ewma_alpha={self.ewma_alpha!r}: need 0 < alpha <= 1")
        if self.ignore_first < 0:
            raise InspectError(f"policy ignore_first={self.ignore_first!r}: need >= 0")

    def version(self) -> str:
        """``POLICY_VERSION`` plus a short hash of the settings: names the policy in decisions."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return f"{POLICY_VERSION}#{hashlib.sha256(blob).hexdigest()[:10]}"


@dataclass(frozen=True)
class LayerObs:
    """One scored layer as the policy sees it.

    ``label`` is the model's arg-max class, which can be the normal class on a layer over the
    threshold; ``defect_class`` (with ``defect_p``) is the likeliest defect class, the one a
    decision names.
    """

    layer: int
    score: float
    label: str = ""
    defect_class: str = ""
    defect_p: float | None = None

    @classmethod
    def of(cls, layer: int, score) -> LayerObs:
        """The observation of a scored layer (an ``inspect3d.infer.model.LayerScore``)."""
        return cls(layer, score.defect_score, score.label, score.defect_class, score.defect_prob)

    @property
    def named_class(self) -> tuple[str, float | None]:
        """(class, p) a decision names: the likeliest defect class when known, else the label."""
        return (self.defect_class, self.defect_p) if self.defect_class else (self.label, None)


@dataclass(frozen=True)
class Decision:
    """An escalation of a job: level WARN or REJECT, with the reason."""

    level: str
    rule: str
    at_layer: int
    first_bad_layer: int | None
    layers: tuple[int, ...]
    scores: tuple[float, ...]
    label: str  # the class named: the likeliest defect class of the highest-scoring layer
    ewma: float
    label_p: float | None = None  # its probability, when known

    def reason(self) -> dict:
        return {
            "rule": self.rule,
            "at_layer": self.at_layer,
            "first_bad_layer": self.first_bad_layer,
            "layers": list(self.layers),
            "scores": [round(s, 6) for s in self.scores],
            "class": self.label,
            "class_p": None if self.label_p is None else round(self.label_p, 6),
            "ewma": round(self.ewma, 6),
        }

    def text(self) -> str:
        """The reason in one line: 'REJECT at layer 7: 3 of the last 5 layers >= 0.08; ...'."""
        out = f"{self.level} at layer {self.at_layer}: {self.rule}"
        if self.first_bad_layer is not None:
            out += f"; first bad layer {self.first_bad_layer}"
        if self.label:
            p = "" if self.label_p is None else f" (p={self.label_p:.2f})"
            out += f"; likeliest defect {self.label}{p}"
        return out


@dataclass(frozen=True)
class JobState:
    """What the policy remembers of a job between layers."""

    level: str = "OK"
    ewma: float | None = None
    window: tuple[LayerObs, ...] = field(default_factory=tuple)
    first_bad: int | None = None
    seen: int = 0  # layers fed so far, ignored ones included


def step(
    state: JobState, obs: LayerObs, cfg: PolicyConfig, threshold: float
) -> tuple[JobState, Decision | None]:
    """Feed one layer; return the new state and a Decision when the job escalates."""
    if state.seen < cfg.ignore_first:
        return replace(state, seen=state.seen + 1), None
    bad = obs.score >= threshold
    ewma = (
        obs.score
        if state.ewma is None
        else cfg.ewma_alpha * obs.score + (1 - cfg.ewma_alpha) * state.ewma
    )
    window = (*state.window, obs)[-cfg.n :]
    first_bad = state.first_bad if state.first_bad is not None or not bad else obs.layer
    new = replace(state, ewma=ewma, window=window, first_bad=first_bad, seen=state.seen + 1)
    level, rule = _level(window, ewma, cfg, threshold)
    if LEVELS.index(level) <= LEVELS.index(state.level):
        return new, None
    flagged = [o for o in window if o.score >= threshold] or [obs]
    named, named_p = max(flagged, key=lambda o: o.score).named_class
    decision = Decision(
        level=level,
        rule=rule,
        at_layer=obs.layer,
        first_bad_layer=first_bad,
        layers=tuple(o.layer for o in flagged),
        scores=tuple(o.score for o in flagged),
        label=named,
        ewma=ewma,
        label_p=named_p,
    )
    return replace(new, level=level), decision


def _level(
    window: tuple[LayerObs, ...], ewma: float, cfg: PolicyConfig, threshold: float
) -> tuple[str, str]:
    n_bad = sum(o.score >= threshold for o in window)
    if n_bad >= cfg.k:
        return "REJECT", f"{n_bad} of the last {len(window)} layers >= {threshold:.4g}"
    if cfg.ewma_level is not None and ewma >= cfg.ewma_level:
        return "REJECT", f"ewma {ewma:.4g} >= {cfg.ewma_level:.4g}"
    if n_bad >= cfg.warn_k:
        return "WARN", f"{n_bad} of the last {len(window)} layers >= {threshold:.4g}"
    return "OK", ""


def replay(
    layers: list[LayerObs], cfg: PolicyConfig, threshold: float
) -> tuple[JobState, list[Decision]]:
    """Run the policy over a job's layers in order: final state and every escalation."""
    state, decisions = JobState(), []
    for obs in layers:
        state, decision = step(state, obs, cfg, threshold)
        if decision is not None:
            decisions.append(decision)
    return state, decisions
