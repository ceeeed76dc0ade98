"""Inline SVG charts for the HTML report: grouped bars, a confusion heatmap and a line chart.

Each chart is drawn as a string of SVG markup with no scripts, fonts or URLs, so the page that
holds it stays self-contained. Every text a caller passes in (names, labels, titles) is
HTML-escaped here. The module also owns the two formatting helpers the report shares with its
charts, `escape` and `percent`, so both render the same text the same way.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class BarSeries:
    """One series of a grouped bar chart: a bar in each group, drawn in one colour."""

    name: str
    """Shown in the legend and the bars' tooltips."""
    color: str
    """CSS colour of the bars and the legend swatch, e.g. "#2563eb"."""
    values: Sequence[float]
    """One value per group, as a share in [0, 1]; values outside are clamped to it."""
    intervals: Sequence[tuple[float, float] | None] = ()
    """Optional (low, high) interval per group, drawn as a whisker on the bar; empty or None: none."""


def bar_chart(groups: Sequence[str], series: Sequence[BarSeries], label: str) -> str:
    """Draws grouped bars: one group per entry of `groups`, one bar per series, y from 0 to 100%.

    The y axis always starts at 0, so bar heights compare honestly; a series' intervals are drawn
    as whiskers (the caller's caption says what they are).

    Args:
        groups: Group titles, shown under each group, in order.
        series: The bars of each group, in order, with a legend below; at least one.
        label: Accessible name of the chart (its aria-label).

    Returns:
        The `<svg>` element as a string.
    """
    width, height, left, top, bottom = 560, 260, 48, 16, 56
    plot_h = height - top - bottom
    group_w = (width - left - 16) / len(groups)
    bar_w = min(48.0, (group_w - 24) / len(series))
    parts = [_y_grid(left, top, width - 8, plot_h, [0, 0.25, 0.5, 0.75, 1.0], lambda v: f"{100 * v:.0f}%")]
    for g, title in enumerate(groups):
        x0 = left + g * group_w + (group_w - bar_w * len(series)) / 2
        for i, bars in enumerate(series):
            value = min(max(bars.values[g], 0.0), 1.0)
            x, h = x0 + i * bar_w, value * plot_h
            y = top + plot_h - h
            parts.append(
                f'<rect x="{x + 2:.1f}" y="{y:.1f}" width="{bar_w - 4:.1f}" height="{h:.1f}" '
                f'fill="{bars.color}"><title>{escape(bars.name)} {escape(title)}: {percent(value)}'
                "</title></rect>"
                f'<text x="{x + bar_w / 2:.1f}" y="{y - 4:.1f}" class="val">{100 * value:.1f}</text>'
            )
            interval = bars.intervals[g] if g < len(bars.intervals) else None
            if interval is not None:
                lo, hi = (top + plot_h - min(max(v, 0.0), 1.0) * plot_h for v in interval)
                mid = x + bar_w / 2
                parts.append(
                    f'<path d="M{mid:.1f} {lo:.1f}V{hi:.1f}M{mid - 5:.1f} {lo:.1f}h10M{mid - 5:.1f} {hi:.1f}h10" '
                    f'stroke="#111827" stroke-width="1.2" fill="none"><title>{escape(bars.name)} {escape(title)}: '
                    f"95% interval {percent(interval[0])}-{percent(interval[1])}</title></path>"
                )
        parts.append(
            f'<text x="{left + (g + 0.5) * group_w:.1f}" y="{top + plot_h + 18}" class="axis-title">'
            f"{escape(title)}</text>"
        )
    legend_x = left
    for bars in series:
        parts.append(
            f'<rect x="{legend_x}" y="{height - 16}" width="10" height="10" fill="{bars.color}"/>'
            f'<text x="{legend_x + 14}" y="{height - 7}" class="legend">{escape(bars.name)}</text>'
        )
        legend_x += 24 + 7 * len(bars.name)
    return _svg(width, height, label, parts)


def heatmap(confusion: Sequence[Sequence[int]], labels: Sequence[str]) -> str:
    """Draws a confusion matrix as a grid of cells shaded by row share, with counts and label names.

    Args:
        confusion: Counts, `confusion[true][predicted]`, square and in the order of `labels`.
        labels: Label names; long ones are clipped on the axes and shown whole in tooltips.

    Returns:
        The `<svg>` element as a string.
    """
    k = len(labels)
    cell = max(22.0, min(56.0, 420.0 / max(k, 1)))
    names = [_clip(label, 18) for label in labels]
    margin = 16 + 6.5 * max(len(n) for n in names)
    left, top = margin + 20, margin + 20
    # Column labels lean right at 45°, so leave room for the last one past the grid.
    width, height = left + k * cell + 0.75 * margin, top + k * cell + 16
    parts = [
        f'<text x="{left + k * cell / 2:.1f}" y="14" class="axis-title">Predicted</text>',
        f'<text x="14" y="{top + k * cell / 2:.1f}" class="axis-title" '
        f'transform="rotate(-90 14 {top + k * cell / 2:.1f})">True</text>',
    ]
    for i in range(k):
        y_mid = top + (i + 0.5) * cell
        x_mid = left + (i + 0.5) * cell
        parts.append(
            f'<text x="{left - 6:.1f}" y="{y_mid + 4:.1f}" class="row-label">'
            f"<title>{escape(labels[i])}</title>{escape(names[i])}</text>"
            f'<text x="{x_mid:.1f}" y="{top - 6:.1f}" class="col-label" '
            f'transform="rotate(-45 {x_mid:.1f} {top - 6:.1f})"><title>{escape(labels[i])}</title>'
            f"{escape(names[i])}</text>"
        )
    for i, row in enumerate(confusion):
        total = sum(row)
        for j, count in enumerate(row):
            share = count / total if total else 0.0
            x, y = left + j * cell, top + i * cell
            ink = "#ffffff" if share > 0.55 else "#111827"
            edge = ' stroke="#111827" stroke-width="1.5"' if i == j else ' stroke="#ffffff"'
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{cell:.1f}" height="{cell:.1f}" '
                f'fill="{_blend(share)}"{edge}><title>true {escape(labels[i])}, predicted {escape(labels[j])}: '
                f"{count} ({percent(share)} of row)</title></rect>"
                f'<text x="{x + cell / 2:.1f}" y="{y + cell / 2 + 4:.1f}" class="count" style="fill:{ink}">'
                f"{count}</text>"
            )
    return _svg(width, height, "Confusion matrix", parts)


def line_chart(points: Sequence[tuple[float, float]], title: str, color: str, *, y_from_zero: bool = False) -> str:
    """Draws a line through (step, value) points, with min/max-scaled axes and a title.

    Args:
        points: (step, value) pairs sorted by step; at least one, all finite.
        title: Shown above the plot and used as the chart's accessible name.
        color: CSS colour of the line and its markers.
        y_from_zero: Start the y axis at 0 (for non-negative series), so the curve's rise is not
            exaggerated; otherwise the axis spans the values and the title says it is zoomed.

    Returns:
        The `<svg>` element as a string. Series of up to 60 points also get a marker with a
        tooltip per point.
    """
    width, height, left, top, bottom, right = 420, 230, 56, 28, 36, 14
    plot_w, plot_h = width - left - right, height - top - bottom
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_lo, x_hi = _span(min(xs), max(xs))
    y_lo, y_hi = _span(min(ys), max(ys))
    if y_from_zero and min(ys) >= 0:
        y_lo = 0.0
    elif y_lo > 0 or y_hi < 0:
        title = f"{title} (y axis zoomed, not from 0)"

    def sx(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * plot_w

    def sy(y: float) -> float:
        return top + plot_h - (y - y_lo) / (y_hi - y_lo) * plot_h

    parts = [
        f'<text x="{left}" y="16" class="chart-title">{escape(title)}</text>',
        _y_grid(
            left,
            top,
            width - right,
            plot_h,
            [t / 4 for t in range(5)],
            lambda f: f"{y_lo + f * (y_hi - y_lo):.3g}",
        ),
    ]
    for t in range(5):
        step = x_lo + (x_hi - x_lo) * t / 4
        parts.append(f'<text x="{sx(step):.1f}" y="{top + plot_h + 16}" class="tick-x">{step:.0f}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 2}" class="axis-title">step</text>')
    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    parts.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="2"/>')
    if len(points) <= 60:
        parts += [
            f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}">'
            f"<title>step {x:.0f}: {y:.4g}</title></circle>"
            for x, y in points
        ]
    return _svg(width, height, title, parts)


def escape(text: object) -> str:
    """HTML-escapes `str(text)`, quotes included, for use in element text and attribute values."""
    return html.escape(str(text), quote=True)


def percent(value: float) -> str:
    """Formats a share in [0, 1] as a percentage with one decimal, e.g. 0.912 -> "91.2%"."""
    return f"{100 * value:.1f}%"


# ---------------------------------------------------------------------------------------------
# Helpers


def _y_grid(
    left: float,
    top: float,
    right: float,
    plot_h: float,
    fractions: Sequence[float],
    fmt: Callable[[float], str],
) -> str:
    """Horizontal grid lines at `fractions` of the plot height, labelled with fmt(fraction)."""
    lines = []
    for f in fractions:
        y = top + plot_h - f * plot_h
        lines.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" class="grid"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" class="tick-y">{escape(fmt(f))}</text>'
        )
    return "".join(lines)


def _svg(width: float, height: float, label: str, parts: Sequence[str]) -> str:
    # No xmlns: inline SVG in HTML5 does not need one, and the page stays free of URLs.
    return (
        f'<svg viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" height="{height:.0f}" '
        f'role="img" aria-label="{escape(label)}">{"".join(parts)}</svg>'
    )


def _span(lo: float, hi: float) -> tuple[float, float]:
    """Axis range with a little headroom; a flat series gets a visible band around its value."""
    if hi - lo < 1e-12:
        pad = max(abs(lo) * 0.1, 0.5)
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad


def _blend(share: float) -> str:
    """White-to-blue shade for a share in [0, 1]."""
    lo, hi = (248, 250, 252), (29, 78, 216)
    r, g, b = (round(a + (z - a) * min(max(share, 0.0), 1.0)) for a, z in zip(lo, hi, strict=True))
    return f"#{r:02x}{g:02x}{b:02x}"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
