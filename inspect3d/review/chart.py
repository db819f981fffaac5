"""The score-by-layer chart as inline SVG: no plotting library on the shop-floor PC.

The score axis is logarithmic from a tenth of the threshold up to the top score (at least 1):
a threshold of 0.08 on a plain 0-1 axis sits in the bottom 8 % where no crossing can be seen;
on this axis the region around it is as tall as any other ratio. Points over the threshold are
red. The first bad layer
and the WARN/REJECT decisions are vertical marks whose labels sit in lanes above the plot, so
they never overlap each other or the data (marks on the same layer share one label). Only
numbers and fixed words go into the markup, so nothing from the store needs escaping here.
"""

from __future__ import annotations

import math

from markupsafe import Markup

W, H = 760, 260
LEFT, RIGHT, BOTTOM = 56, 92, 36
LANE_H, CHAR_W = 14, 6.4  # label lane height; average glyph width of the 11 px font
COLOURS = {"first bad layer": "#e67e22", "WARN": "#b7860b", "REJECT": "#c0392b"}
RED, BLUE = "#c0392b", "#2c7fb8"


def score_chart(
    points: list[tuple[int, float]], threshold: float, marks: dict[str, int | None]
) -> Markup:
    """SVG of ``points`` (layer, score); ``marks``: label -> layer (first bad, WARN, REJECT)."""
    if not points:
        return Markup('<p class="muted">No scored layers.</p>')
    lo, hi = min(p[0] for p in points), max(p[0] for p in points)
    x = _linear(lo, hi, LEFT, W - RIGHT)
    labels = _lanes(_group(marks), x)
    top = 14 + LANE_H * (1 + max((lane for *_, lane in labels), default=-1))
    y = ScoreAxis(threshold, max(1.0, max(s for _, s in points)), H - BOTTOM, top)
    parts = [_frame(top), _layer_ticks(lo, hi, x), y.ticks(), y.threshold_line()]
    parts += [_mark(text, layer, colour, lane, x, top) for text, layer, colour, lane in labels]
    parts.append(_line(points, x, y, threshold))
    svg = (
        f'<svg class="chart" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
        f'xmlns="http://www.w3.org/2000/svg" aria-label="defect score by layer">'
        + "".join(parts)
        + "</svg>"
    )
    return Markup(svg)


def _linear(a: float, b: float, p: float, q: float):
    span = (b - a) or 1.0
    return lambda v: round(p + (v - a) / span * (q - p), 1)


class ScoreAxis:
    """Score -> pixel row on a log axis from a tenth of the threshold to the top score (>= 1).

    Equal ratios get equal heights, so a score 10 % over a threshold of 0.08 is as far from it
    as one 10 % over 0.5 would be; scores under a tenth of the threshold sit on the bottom.
    """

    DECADES_BELOW = 1.0

    def __init__(self, threshold: float, top_score: float, bottom_px: float, top_px: float):
        self.t = max(threshold, 1e-6)
        self.lo = math.log10(self.t) - self.DECADES_BELOW
        self.hi = max(math.log10(max(top_score, 1e-6)), math.log10(self.t) + 0.3)
        self.bottom_px, self.top_px = bottom_px, top_px

    def __call__(self, s: float) -> float:
        v = (math.log10(max(s, 10**self.lo)) - self.lo) / (self.hi - self.lo)
        return round(self.bottom_px + min(v, 1.0) * (self.top_px - self.bottom_px), 1)

    def values(self) -> list[float]:
        """Tick values: 1-2-5 steps in range, kept clear of the threshold and of each other."""
        steps = [m * 10.0**k for k in range(math.floor(self.lo), math.ceil(self.hi) + 1)
                 for m in (1, 2, 5)]  # fmt: skip
        out: list[float] = []
        for v in sorted(v for v in steps if self.lo <= math.log10(v) <= self.hi + 1e-9):
            if all(abs(self(v) - self(u)) >= 14 for u in [*out, self.t]):
                out.append(v)
        return out

    def ticks(self) -> str:
        out = [
            f'<line x1="{LEFT - 4}" x2="{LEFT}" y1="{self(v)}" y2="{self(v)}" stroke="#888"/>'
            f'<text x="{LEFT - 6}" y="{self(v) + 4}" text-anchor="end">{v:.3g}</text>'
            for v in self.values()
        ]
        mid = (self.top_px + self.bottom_px) / 2
        out.append(
            f'<text transform="translate(14 {mid}) rotate(-90)" text-anchor="middle">'
            "defect score</text>"
        )
        return "".join(out)

    def threshold_line(self) -> str:
        y = self(self.t)
        return (
            f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y}" y2="{y}" stroke="{RED}" '
            f'stroke-dasharray="6 4"/><text x="{W - RIGHT + 6}" y="{y - 2}" fill="{RED}">'
            f'threshold</text><text x="{W - RIGHT + 6}" y="{y + 11}" fill="{RED}">{self.t:.3g}'
            "</text>"
        )


def _frame(top: float) -> str:
    return (
        f'<rect x="{LEFT}" y="{top}" width="{W - LEFT - RIGHT}" height="{H - top - BOTTOM}" '
        'fill="#fafafa" stroke="#bbb"/>'
    )


def _layer_ticks(lo: int, hi: int, x) -> str:
    step = max(1, round((hi - lo) / 10))
    out = [
        f'<text x="{x(layer)}" y="{H - BOTTOM + 16}" text-anchor="middle">{layer}</text>'
        for layer in range(lo, hi + 1, step)
    ]
    out.append(f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 4}" text-anchor="middle">layer</text>')
    return "".join(out)


def _group(marks: dict[str, int | None]) -> list[tuple[str, int, str]]:
    """One (label, layer, colour) per marked layer; names on the same layer are joined."""
    by_layer: dict[int, list[str]] = {}
    for name, layer in marks.items():
        if layer is not None:
            by_layer.setdefault(layer, []).append(name)
    out = []
    for layer, names in sorted(by_layer.items()):
        colour = COLOURS.get(names[-1], "#555")  # the most severe, given in that order
        out.append((f"{', '.join(names)} ({layer})", layer, colour))
    return out


def _lanes(labels: list[tuple[str, int, str]], x) -> list[tuple[str, int, str, int]]:
    """Give each label the first lane where it does not overlap the last one placed there."""
    ends: list[float] = []  # right edge of the last label in each lane
    out = []
    for text, layer, colour in labels:
        left, right = _extent(text, x(layer))
        lane = next((i for i, end in enumerate(ends) if left > end + 6), len(ends))
        if lane == len(ends):
            ends.append(right)
        ends[lane] = right
        out.append((text, layer, colour, lane))
    return out


def _extent(text: str, px: float) -> tuple[float, float]:
    """Left and right edge of a label at the mark ``px``: right of it, else left if no room."""
    width = len(text) * CHAR_W
    return (px + 4, px + 4 + width) if px + 4 + width <= W - 4 else (px - 4 - width, px - 4)


def _mark(text: str, layer: int, colour: str, lane: int, x, top: float) -> str:
    px = x(layer)
    left, _ = _extent(text, px)
    ty = 12 + LANE_H * lane + 10
    return (
        f'<line x1="{px}" x2="{px}" y1="{ty + 2}" y2="{H - BOTTOM}" stroke="{colour}" '
        f'stroke-width="2" stroke-opacity="0.85"/><text x="{left}" y="{ty}" fill="{colour}" '
        f'font-weight="600">{text}</text>'
    )


def _line(points: list[tuple[int, float]], x, y, threshold: float) -> str:
    path = " ".join(f"{x(layer)},{y(s)}" for layer, s in points)
    dots = "".join(
        f'<circle cx="{x(layer)}" cy="{y(s)}" r="3.5" '
        f'fill="{RED if s >= threshold else BLUE}"><title>layer {layer}: {s:.3f}'
        "</title></circle>"
        for layer, s in points
    )
    return f'<polyline points="{path}" fill="none" stroke="{BLUE}" stroke-width="1.5"/>' + dots
