"""The score-by-layer chart as inline SVG: no plotting library on the shop-floor PC.

Points over the threshold are red, the threshold is a dashed line, the first bad layer and the
WARN/REJECT decisions are vertical marks with a label. Only numbers and fixed words go into the
markup, so nothing from the store needs escaping here.
"""

from __future__ import annotations

from markupsafe import Markup

W, H = 760, 240
LEFT, RIGHT, TOP, BOTTOM = 48, 16, 28, 36


def score_chart(
    points: list[tuple[int, float]], threshold: float, marks: dict[str, int | None]
) -> Markup:
    """SVG of ``points`` (layer, score); ``marks``: label -> layer (first bad, WARN, REJECT)."""
    if not points:
        return Markup('<p class="muted">No scored layers.</p>')
    lo, hi = min(p[0] for p in points), max(p[0] for p in points)
    x = _scale(lo, hi, LEFT, W - RIGHT)
    y = _scale(0.0, 1.0, H - BOTTOM, TOP)
    parts = [_axes(lo, hi, x, y), _threshold(threshold, y)]
    parts += [_mark(name, layer, x) for name, layer in marks.items() if layer is not None]
    parts.append(_line(points, x, y, threshold))
    svg = (
        f'<svg class="chart" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
        f'xmlns="http://www.w3.org/2000/svg" aria-label="defect score by layer">'
        + "".join(parts)
        + "</svg>"
    )
    return Markup(svg)


def _scale(a: float, b: float, p: float, q: float):
    span = (b - a) or 1.0
    return lambda v: round(p + (v - a) / span * (q - p), 1)


def _axes(lo: int, hi: int, x, y) -> str:
    out = [f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" '
           'fill="#fafafa" stroke="#bbb"/>']  # fmt: skip
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        out.append(f'<text x="{LEFT - 6}" y="{y(v) + 4}" text-anchor="end">{v:g}</text>')
    step = max(1, round((hi - lo) / 10))
    for layer in range(lo, hi + 1, step):
        out.append(
            f'<text x="{x(layer)}" y="{H - BOTTOM + 16}" text-anchor="middle">{layer}</text>'
        )
    out.append(f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 4}" text-anchor="middle">layer</text>')
    out.append(f'<text x="12" y="{TOP - 10}">defect score</text>')
    return "".join(out)


def _threshold(t: float, y) -> str:
    return (
        f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y(t)}" y2="{y(t)}" stroke="#c0392b" '
        f'stroke-dasharray="6 4"/><text x="{W - RIGHT - 4}" y="{y(t) - 5}" text-anchor="end" '
        f'fill="#c0392b">threshold {t:.3g}</text>'
    )


COLOURS = {"first bad layer": "#e67e22", "WARN": "#d4a017", "REJECT": "#c0392b"}


def _mark(name: str, layer: int, x) -> str:
    colour = COLOURS.get(name, "#555")
    dy = {"first bad layer": 0, "WARN": 13, "REJECT": 26}.get(name, 0)  # labels at the bottom:
    return (  # scores of flagged jobs sit near the top
        f'<line x1="{x(layer)}" x2="{x(layer)}" y1="{TOP}" y2="{H - BOTTOM}" stroke="{colour}" '
        f'stroke-width="2"/><text x="{x(layer) + 4}" y="{H - BOTTOM - 6 - dy}" fill="{colour}">'
        f"{name} ({layer})</text>"
    )


def _line(points: list[tuple[int, float]], x, y, threshold: float) -> str:
    path = " ".join(f"{x(layer)},{y(s)}" for layer, s in points)
    dots = "".join(
        f'<circle cx="{x(layer)}" cy="{y(s)}" r="3.5" '
        f'fill="{"#c0392b" if s >= threshold else "#2c7fb8"}"><title>layer {layer}: {s:.3f}'
        "</title></circle>"
        for layer, s in points
    )
    return f'<polyline points="{path}" fill="none" stroke="#2c7fb8" stroke-width="1.5"/>' + dots
