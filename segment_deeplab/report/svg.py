"""Charts as inline SVG text: line charts over steps and per-class bars.

Written by hand so the report needs no plotting library and no network: every chart
is a string that goes straight into the HTML.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

Fmt = Callable[[float], str]

# Colours of lines after the first (Tableau 10, readable on white).
LINE_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def percent(v: float) -> str:
    return f"{100 * v:.3g}%"


def general(v: float) -> str:
    return f"{v:.3g}"


@dataclass
class Series:
    label: str
    xs: Sequence[float]
    ys: Sequence[float | None]
    color: str = LINE_COLORS[0]
    markers: bool | None = None  # None: only when there are few points


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values (1, 2, 2.5 or 5 times a power of ten) over lo..hi."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    # The axis ends on ticks: from the tick at or below lo to the one at or above hi.
    v = math.floor(lo / step + 1e-9) * step
    end = math.ceil(hi / step - 1e-9) * step
    ticks = []
    while v <= end + step * 1e-6:
        ticks.append(round(v, 12))
        v += step
    return ticks


def _points(s: Series) -> list[tuple[float, float]]:
    return [
        (float(x), float(y))
        for x, y in zip(s.xs, s.ys, strict=False)
        if y is not None and math.isfinite(float(y))
    ]


def _legend(series: Sequence[Series], x0: float, x1: float) -> list[tuple[int, float, Series]]:
    """(row, x, series) of each legend entry, wrapping into rows below the plot."""
    out, row, x = [], 0, x0
    for s in series:
        w = 14 + 6.5 * len(s.label) + 14
        if x + w > x1 and x > x0:
            row, x = row + 1, x0
        out.append((row, x, s))
        x += w
    return out


# One chart drawn top to bottom (frame, ticks, series, legend): longer than most
# functions here, as splitting it would scatter the coordinate maths it shares.
def line_chart(
    series: Sequence[Series],
    title: str,
    fmt: Fmt = general,
    y_range: tuple[float | None, float | None] = (None, None),
    width: int = 480,
    height: int = 260,
) -> str:
    """An SVG line chart of `series` against the step, with axes, grid and legend.

    Args:
        y_range: fixed (low, high) ends of the y axis; None ends follow the data.
    """
    data = [(s, _points(s)) for s in series]
    pts = [p for _, ps in data for p in ps]
    left, right, top, bottom = 56, 14, 30, 34
    legend = _legend(series, left, width - right) if len(series) > 1 else []
    rows = max((r for r, _, _ in legend), default=-1) + 1
    pw, ph = width - left - right, height - top - bottom
    height += 18 * rows + (6 if rows else 0)
    out = [
        f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
        f'<text x="{left}" y="18" class="ct">{escape(title)}</text>',
    ]
    for row, x, s in legend:
        y = top + ph + bottom + 12 + 18 * row
        out.append(f'<rect x="{x}" y="{y - 9}" width="10" height="10" fill="{s.color}"/>')
        out.append(f'<text x="{x + 14}" y="{y}" class="lg">{escape(s.label)}</text>')
    if not pts:
        out.append(f'<text x="{width / 2}" y="{height / 2}" class="na">no data</text></svg>')
        return "".join(out)
    x_lo, x_hi = min(p[0] for p in pts), max(p[0] for p in pts)
    ys = [p[1] for p in pts]
    y_lo = y_range[0] if y_range[0] is not None else min(ys)
    y_hi = y_range[1] if y_range[1] is not None else max(ys)
    x_ticks, y_ticks = nice_ticks(min(0.0, x_lo), x_hi, 5), nice_ticks(y_lo, y_hi, 4)
    y_ticks = [t for t in y_ticks if y_range[1] is None or t <= y_range[1] + 1e-9] or [y_hi]
    x0, x1 = min(x_ticks[0], x_lo), max(x_ticks[-1], x_hi)
    y0, y1 = min(y_ticks[0], y_lo), max(y_ticks[-1], y_hi)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + ph - (y - y0) / (y1 - y0) * ph

    for t in y_ticks:
        y = sy(t)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" class="yt">{escape(fmt(t))}</text>')
    for t in x_ticks:
        x = sx(t)
        out.append(f'<text x="{x:.1f}" y="{top + ph + 16}" class="xt">{t:g}</text>')
    out.append(f'<text x="{left + pw}" y="{top + ph + 30}" class="xl">step</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>')
    for s, ps in data:
        if not ps:
            continue
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in ps)
        out.append(f'<polyline points="{coords}" fill="none" stroke="{s.color}" class="ln"/>')
        if s.markers or (s.markers is None and len(ps) <= 30):
            for x, y in ps:
                out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{s.color}"/>')
    out.append("</svg>")
    return "".join(out)


def class_bars(
    names: Sequence[str],
    colors: Sequence[tuple[int, int, int]],
    iou: Sequence[float | None],
    share: Sequence[float | None] | None,
    width: int = 480,
) -> str:
    """Horizontal per-class bars: IoU (blue, 0..100%) and the class's share of pixels (grey).

    A class without an IoU (absent from ground truth and prediction) reads "n/a".
    """
    row = 34 if share is not None else 22
    label_w, value_w, top = 130, 64, 8
    bar_w = width - label_w - value_w - 10
    height = top + row * len(names) + 22
    out = [
        f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" xmlns="http://www.w3.org/2000/svg"><title>per-class IoU</title>'
    ]
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        x = label_w + t * bar_w
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{height - 18}" class="grid"/>')
        out.append(f'<text x="{x:.1f}" y="{height - 4}" class="xt">{percent(t)}</text>')
    for i, name in enumerate(names):
        y = top + i * row
        r, g, b = colors[i] if i < len(colors) else (200, 200, 200)
        out.append(
            f'<rect x="0" y="{y + 3}" width="12" height="12" fill="rgb({r},{g},{b})" '
            'stroke="#555" stroke-width="0.5"/>'
        )
        label = name if len(name) <= 16 else name[:15] + "\u2026"
        out.append(f'<text x="18" y="{y + 13}" class="bl">{escape(label)}</text>')
        v = iou[i] if i < len(iou) else None
        if v is None:
            out.append(f'<text x="{label_w + 4}" y="{y + 13}" class="na2">n/a</text>')
        else:
            w = max(0.0, min(1.0, v)) * bar_w
            out.append(f'<rect x="{label_w}" y="{y + 2}" width="{w:.1f}" height="14" class="iou"/>')
            out.append(
                f'<text x="{label_w + bar_w + 6}" y="{y + 13}" class="bv">{100 * v:.1f}%</text>'
            )
        if share is not None:
            s = share[i] if i < len(share) else None
            if s is not None:
                w = max(0.0, min(1.0, s)) * bar_w
                out.append(
                    f'<rect x="{label_w}" y="{y + 19}" width="{max(w, 0.5):.1f}" height="7" '
                    'class="share"/>'
                )
                tx = label_w + bar_w + 6
                out.append(f'<text x="{tx}" y="{y + 27}" class="sv">{100 * s:.1f}% px</text>')
    out.append("</svg>")
    return "".join(out)
