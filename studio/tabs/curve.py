"""The live panel's loss curve as a small inline SVG, drawn here from the run's points.

The page swaps it in as it is (studio/tabs/live.js, every 3 s while the run trains). A charting component
re-lays out its whole chart from the data on every update; on a machine of few cores that CPU comes out of the
training run's share, and it grows with the run's length. This drawing costs the browser one small DOM swap,
whatever the run's length: each series is thinned to at most MAX_POINTS points.
"""

from __future__ import annotations

import math
from html import escape

WIDTH, HEIGHT = 1000, 300  # drawn at the panel's width: about this size on a laptop screen
LEFT, RIGHT, TOP, BOTTOM = 64, 12, 32, 34  # room for the axis labels and the legend
MAX_POINTS = 400
# name -> (colour, line width)
STYLE = {"train": ("#94a3b8", 1.2), "train (smoothed)": ("#ea580c", 2.2), "validation": ("#2563eb", 2.2)}


def thinned(points: list[tuple[float, float]], limit: int = MAX_POINTS) -> list[tuple[float, float]]:
    """Every k-th point and always the last, so the curve keeps its shape and ends where the run is."""
    if len(points) <= limit:
        return points
    stride = math.ceil(len(points) / (limit - 1))  # room for the last point
    return points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])


def _ticks(low: float, high: float, count: int = 4) -> list[float]:
    return [low + (high - low) * i / count for i in range(count + 1)]


def _label(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def curve_svg(series: dict[str, list[tuple[float, float]]], title: str, y_title: str = "loss") -> str:
    """`series`: name (a key of STYLE) -> [(step, value)]. Non-finite values are left out."""
    series = {name: thinned([(s, v) for s, v in points if math.isfinite(v)]) for name, points in series.items()}
    series = {name: points for name, points in series.items() if points}
    if not series:
        return (f'<div class="live-curve"><b>{escape(title)}</b>'
                '<p class="live-curve-empty">The curve appears with the first training step.</p></div>')
    steps = [s for points in series.values() for s, _ in points]
    values = [v for points in series.values() for _, v in points]
    x0, x1 = min(steps), max(steps)
    y0, y1 = min(values), max(values)
    x1 = x1 if x1 > x0 else x0 + 1
    pad = (y1 - y0) * 0.05 or abs(y0) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(step: float) -> float:
        return LEFT + (step - x0) / (x1 - x0) * plot_w

    def y(value: float) -> float:
        return TOP + (y1 - value) / (y1 - y0) * plot_h

    parts = [f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" role="img" aria-label="{escape(title)}" '
             'font-size="13" font-family="sans-serif" fill="currentColor">',
             f'<text x="{LEFT}" y="18" font-size="15" font-weight="bold">{escape(title)}</text>']
    for value in _ticks(y0 + pad, y1 - pad):
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
                     'stroke="#e5e7eb"/>'
                     f'<text x="{LEFT - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{_label(value)}</text>')
    for step in sorted({round(step) for step in _ticks(x0, x1)}):  # whole steps, each once (a 3-step run: 1 2 3)
        parts.append(f'<text x="{x(step):.1f}" y="{HEIGHT - 14}" text-anchor="middle">{step:.0f}</text>')
    parts.append(f'<text x="{WIDTH - RIGHT}" y="{HEIGHT - 1}" text-anchor="end">step</text>'
                 f'<text x="12" y="{TOP + plot_h / 2:.0f}" transform="rotate(-90 12 {TOP + plot_h / 2:.0f})" '
                 f'text-anchor="middle">{escape(y_title)}</text>')
    for name, points in series.items():  # in the order given: the raw loss first, underneath the others
        colour, width = STYLE[name]
        line = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="{width}" points="{line}"/>')
        if len(points) == 1:  # a lone point (one evaluation so far) would draw nothing
            parts.append(f'<circle cx="{x(points[0][0]):.1f}" cy="{y(points[0][1]):.1f}" r="3" fill="{colour}"/>')
    legend_x = WIDTH - RIGHT
    for name in reversed(series):  # right-aligned, in the same order
        colour = STYLE[name][0]
        legend_x -= 8 + 7 * len(name)
        parts.append(f'<rect x="{legend_x:.0f}" y="8" width="11" height="11" fill="{colour}"/>'
                     f'<text x="{legend_x + 15:.0f}" y="18">{escape(name)}</text>')
        legend_x -= 14
    parts.append("</svg>")
    return f'<div class="live-curve">{"".join(parts)}</div>'
