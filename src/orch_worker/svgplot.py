"""Small inline SVG charts for the HTML report: bars and histograms, no libraries, no scripts.

The report must open anywhere (an e-mail attachment, an air-gapped desk) and render the same in
ten years, so its plots are plain SVG elements written here rather than a charting library, a
CDN or JavaScript. Every chart has a <title> for screen readers and prints its numbers as text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

PALETTE = ("#2f6db5", "#e08a2c", "#3a9d5d", "#c0392b", "#7d5ba6", "#7f8c8d")

WIDTH = 560
LABEL_W = 150
VALUE_W = 90
BAR_H = 16
GAP = 8


def _figure(title: str, svg: list[str]) -> str:
    """The chart with its title visible above it (the SVG <title> is for screen readers)."""
    return f'<figure class="chart"><figcaption>{escape(title)}</figcaption>{"".join(svg)}</figure>'


def _fmt(value: float, unit: str) -> str:
    if math.isnan(value):
        return "n/a"
    text = f"{value:,.4f}".rstrip("0").rstrip(".") if value % 1 else f"{value:,.0f}"
    return f"{text}{unit}"


def bar_chart(
    title: str,
    labels: Sequence[str],
    series: Sequence[tuple[str, Sequence[float]]],
    *,
    unit: str = "",
) -> str:
    """Horizontal bars, one group per label and one bar per series; negatives go left of zero.

    Args:
        title: the chart's accessible title (also shown above it).
        labels: one per group (e.g. account ids).
        series: (name, one value per label); NaN draws no bar and prints n/a.
        unit: appended to the printed values.
    """
    if not labels:
        return f'<p class="empty">{escape(title)}: no data</p>'
    values = [v for _, vs in series for v in vs if not math.isnan(v)]
    lo, hi = min([0.0, *values]), max([0.0, *values])
    span = (hi - lo) or 1.0
    plot_w = WIDTH - LABEL_W - VALUE_W
    zero_x = LABEL_W + plot_w * (0.0 - lo) / span
    group_h = len(series) * BAR_H + GAP
    legend_h = 18 if len(series) > 1 else 0
    height = legend_h + len(labels) * group_h + GAP
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" role="img">',
        f"<title>{escape(title)}</title>",
    ]
    for k, (name, _) in enumerate(series if len(series) > 1 else ()):
        x = LABEL_W + k * 140
        out.append(
            f'<rect x="{x}" y="4" width="10" height="10" fill="{PALETTE[k % len(PALETTE)]}"/>'
            f'<text x="{x + 14}" y="13" class="legend">{escape(name)}</text>'
        )
    for i, label in enumerate(labels):
        y0 = legend_h + i * group_h + GAP / 2
        out.append(
            f'<text x="{LABEL_W - 6}" y="{y0 + group_h / 2:.1f}" text-anchor="end" '
            f'dominant-baseline="middle" class="label">{escape(label)}</text>'
        )
        for k, (_, vs) in enumerate(series):
            v = vs[i]
            y = y0 + k * BAR_H
            if not math.isnan(v):
                x1 = LABEL_W + plot_w * (v - lo) / span
                left, w = min(zero_x, x1), abs(x1 - zero_x)
                out.append(
                    f'<rect x="{left:.1f}" y="{y:.1f}" width="{max(w, 0.5):.1f}" '
                    f'height="{BAR_H - 3}" fill="{PALETTE[k % len(PALETTE)]}"/>'
                )
            out.append(
                f'<text x="{WIDTH - VALUE_W + 6}" y="{y + BAR_H / 2:.1f}" '
                f'dominant-baseline="middle" class="value">{escape(_fmt(v, unit))}</text>'
            )
    out.append(
        f'<line x1="{zero_x:.1f}" y1="{legend_h}" x2="{zero_x:.1f}" y2="{height}" class="axis"/>'
    )
    out.append("</svg>")
    return _figure(title, out)


def histogram(title: str, values: Sequence[float], *, bins: int = 12, unit: str = "") -> str:
    """Vertical bars counting `values` in equal-width bins between their min and max."""
    if not values:
        return f'<p class="empty">{escape(title)}: no data</p>'
    lo, hi = min(values), max(values)
    if hi == lo:
        edges = [lo, lo + 1.0]
        counts = [len(values)]
    else:
        width = (hi - lo) / bins
        edges = [lo + width * k for k in range(bins + 1)]
        counts = [0] * bins
        for v in values:
            counts[min(int((v - lo) / width), bins - 1)] += 1
    height, pad_l, pad_b, top = 200, 40, 34, 14
    plot_w, plot_h = WIDTH - pad_l - 10, height - pad_b - top
    peak = max(counts)
    bar_w = plot_w / len(counts)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" role="img">',
        f"<title>{escape(title)}</title>",
    ]
    for k, c in enumerate(counts):
        h = plot_h * c / peak
        x = pad_l + k * bar_w
        out.append(
            f'<rect x="{x + 1:.1f}" y="{top + plot_h - h:.1f}" width="{max(bar_w - 2, 1):.1f}" '
            f'height="{h:.1f}" fill="{PALETTE[0]}"><title>{_fmt(edges[k], unit)} to '
            f"{_fmt(edges[k + 1], unit)}: {c}</title></rect>"
        )
        if c:
            out.append(
                f'<text x="{x + bar_w / 2:.1f}" y="{top + plot_h - h - 3:.1f}" '
                f'text-anchor="middle" class="value">{c}</text>'
            )
    base = top + plot_h
    out.append(f'<line x1="{pad_l}" y1="{base}" x2="{WIDTH - 10}" y2="{base}" class="axis"/>')
    for k in (0, len(counts)):
        x = pad_l + k * bar_w
        anchor = "start" if k == 0 else "end"
        out.append(
            f'<text x="{x:.1f}" y="{base + 16}" text-anchor="{anchor}" class="label">'
            f"{escape(_fmt(edges[k], unit))}</text>"
        )
    out.append(
        f'<text x="{pad_l + plot_w / 2:.1f}" y="{height - 4}" text-anchor="middle" '
        f'class="label">{len(values)} values</text>'
    )
    out.append("</svg>")
    return _figure(title, out)
