#!/usr/bin/env python3
"""Draws benches/rss.sh's samples as an SVG: one panel per case, the brokers' anonymous memory
(RssAnon, MiB) over time, and a dashed line at stompd's memory budget.

    rss_chart.py SAMPLES.csv OUT.svg [--budget-mib N] [--title TEXT]

Standard library only: the chart is plain SVG text, so it renders in any browser or on GitHub.
"""

import argparse
import csv
from collections import defaultdict
from xml.sax.saxutils import escape

PANEL_WIDTH, PANEL_HEIGHT = 520, 300
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 16, 60, 48
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"]


def nice_step(span, ticks=5):
    """A round tick step (1, 2 or 5 times a power of ten) giving about `ticks` ticks."""
    raw = max(span / ticks, 1e-9)
    power = 10 ** len(str(int(raw))) / 10 if raw >= 1 else 1
    for factor in (1, 2, 5, 10):
        if raw <= factor * power:
            return factor * power
    return 10 * power


def axes(out, xy, frame, maxima, y_label, grid):
    """Grid lines and tick labels of both axes, and their titles (seconds across, `y_label`
    up), for a panel whose plot area is `frame` = (x0, y0, width, height, left edge)."""
    x0, y0, plot_w, plot_h, left = frame
    x_max, y_max = maxima
    step = nice_step(y_max)
    tick = 0.0
    while tick <= y_max:
        _, y = xy(0, tick)
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + plot_w}" y2="{y:.1f}" stroke="{grid}"/>')
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{tick:g}</text>')
        tick += step
    step = nice_step(x_max)
    tick = 0.0
    while tick <= x_max:
        x, _ = xy(tick, 0)
        out.append(f'<text x="{x:.1f}" y="{y0 + 16}" text-anchor="middle">{tick:g}</text>')
        tick += step
    out.append(f'<text x="{x0 + plot_w / 2}" y="{y0 + 36}" text-anchor="middle">seconds</text>')
    out.append(
        f'<text x="{left + 14}" y="{MARGIN_TOP + plot_h / 2}" text-anchor="middle" '
        f'transform="rotate(-90 {left + 14} {MARGIN_TOP + plot_h / 2})">{y_label}</text>'
    )


def panel(case, series, brokers, budget_mib, left):
    """SVG elements of one case's panel, `left` pixels from the image's edge."""
    x_max = max(t for points in series.values() for t, _ in points) or 1
    y_max = max(m for points in series.values() for _, m in points)
    if budget_mib:
        y_max = max(y_max, budget_mib)
    y_max = y_max * 1.1 or 1
    plot_w = PANEL_WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = PANEL_HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
    x0, y0 = left + MARGIN_LEFT, MARGIN_TOP + plot_h

    def xy(t, m):
        return x0 + t / x_max * plot_w, y0 - m / y_max * plot_h

    out = [
        f'<text x="{x0 + plot_w / 2}" y="{MARGIN_TOP - 12}" text-anchor="middle" '
        f'font-weight="bold">{escape(case)}</text>',
        f'<rect x="{x0}" y="{MARGIN_TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>',
    ]
    axes(out, xy, (x0, y0, plot_w, plot_h, left), (x_max, y_max), "RssAnon, MiB", "#eee")
    if budget_mib:
        _, y = xy(0, budget_mib)
        out.append(
            f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + plot_w}" y2="{y:.1f}" stroke="#555" '
            f'stroke-dasharray="6 4"/>'
            f'<text x="{x0 + plot_w - 4}" y="{y - 5:.1f}" text-anchor="end" fill="#555">'
            f"stompd --memory-bytes-max</text>"
        )
    for index, broker in enumerate(brokers):
        points = series.get(broker)
        if not points:
            continue
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(t, m) for t, m in points))
        colour = COLOURS[index % len(COLOURS)]
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("samples")
    parser.add_argument("out")
    parser.add_argument("--budget-mib", type=float, default=0)
    parser.add_argument("--title", default="Broker anonymous memory under pressure")
    args = parser.parse_args()

    # case -> broker -> [(seconds, MiB)], in file order (cases and brokers as first seen).
    data = defaultdict(lambda: defaultdict(list))
    brokers = []
    with open(args.samples, newline="") as samples:
        for broker, case, seconds, anon_kib, _rss_kib, _phase in csv.reader(samples):
            data[case][broker].append((float(seconds), int(anon_kib) / 1024))
            if broker not in brokers:
                brokers.append(broker)

    width = PANEL_WIDTH * max(len(data), 1)
    height = PANEL_HEIGHT + 40
    body = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="14">{escape(args.title)}</text>',
    ]
    for index, (case, series) in enumerate(data.items()):
        body += panel(case, series, brokers, args.budget_mib, index * PANEL_WIDTH)
    for index, broker in enumerate(brokers):
        x = 16 + index * 140
        colour = COLOURS[index % len(COLOURS)]
        body.append(
            f'<line x1="{x}" y1="{height - 14}" x2="{x + 24}" y2="{height - 14}" stroke="{colour}" '
            f'stroke-width="3"/><text x="{x + 30}" y="{height - 10}">{escape(broker)}</text>'
        )
    body.append("</svg>")
    with open(args.out, "w") as out:
        out.write("\n".join(body) + "\n")


if __name__ == "__main__":
    main()
