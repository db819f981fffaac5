"""What a QA reviewer can say about a flagged layer, checked before it reaches the store.

The decisions and reason codes are a fixed list so the exported labels mean the same thing from
one reviewer to the next; a free-text note carries the rest. Reason codes of confirmed defects
that are also a model class (``streak``...) become that layer's training label.
"""

from __future__ import annotations

import getpass
import os
import time
from dataclasses import dataclass

from inspect3d.errors import InspectError
from inspect3d.watch.store import Store

DECISIONS: dict[str, str] = {
    "confirmed_defect": "Confirmed defect",
    "false_alarm": "False alarm",
    "unsure": "Unsure",
}

# decision -> (reason code, what it means); the first code of each is the default.
REASONS: dict[str, tuple[tuple[str, str], ...]] = {
    "confirmed_defect": (
        ("streak", "recoater streak or line across the bed"),
        ("short_feed", "short feed: powder missing on part of the bed"),
        ("super_elevation", "part edge sticks up above the powder"),
        ("spatter", "spatter or ejected particles"),
        ("porosity", "holes, lack of fusion"),
        ("other_defect", "another defect (say which in the note)"),
    ),
    "false_alarm": (
        ("lighting", "lighting or exposure change"),
        ("camera", "camera artefact: blur, glare, dirt on the lens"),
        ("part_geometry", "a normal feature of the part"),
        ("powder_texture", "normal powder texture"),
        ("other_ok", "fine for another reason (say why in the note)"),
    ),
    "unsure": (
        ("needs_expert", "needs a process engineer"),
        ("image_unclear", "image too unclear to tell"),
    ),
}
REASON_TEXT = {code: text for group in REASONS.values() for code, text in group}
MAX_NOTE = 2000


@dataclass(frozen=True)
class Review:
    """One checked review, ready to store."""

    layer_id: int
    decision: str
    reason: str
    note: str
    reviewer: str


def default_reviewer() -> str:
    """The OS user, so a decision always names someone even without ``reviewer=``."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return os.environ.get("USER") or "unknown"


def check(
    layer_id: object, decision: object, reason: object, note: object, reviewer: str
) -> Review:
    """A Review from untrusted form values; InspectError names the bad value and the valid ones."""
    try:
        lid = int(str(layer_id))
    except ValueError:
        raise InspectError(f"layer_id {layer_id!r} is not a layer number") from None
    if decision not in DECISIONS:
        raise InspectError(f"decision {decision!r} is not valid: use one of {list(DECISIONS)}")
    codes = [code for code, _ in REASONS[decision]]
    if reason in (None, ""):
        reason = codes[0]
    if reason not in codes:
        raise InspectError(f"reason {reason!r} is not valid for {decision}: use one of {codes}")
    note = "" if note is None else str(note)
    if len(note) > MAX_NOTE:
        raise InspectError(f"note is {len(note)} characters long: at most {MAX_NOTE}")
    return Review(lid, str(decision), str(reason), note.strip(), reviewer)


def record(store: Store, review: Review, now: float | None = None) -> int:
    """Append ``review`` to the store (superseding, never replacing, earlier ones); its id."""
    try:
        return store.add_review(
            review.layer_id, review.decision, review.reason, review.note, review.reviewer,
            time.time() if now is None else now,
        )  # fmt: skip
    except KeyError:
        raise InspectError(f"layer_id {review.layer_id} is not a layer of this store") from None


def is_open(review: dict | None) -> bool:
    """A flagged layer still needs a reviewer: none yet, or only 'unsure'."""
    return review is None or review["decision"] == "unsure"
