#!/usr/bin/env python3
"""Draws benches/backlog.sh's samples as an SVG: one panel per broker, its anonymous memory
(RssAnon) and mapped file pages (RssFile) in MiB over time, the phases (fill, filled, restart,
drain, drained) shaded and named, the kill -9 marked, one memory scale for all panels, and a
dashed line at stompd's memory budget.

    backlog_chart.py SAMPLES.csv OUT.svg [--budget-mib N] [--title TEXT]

Samples are backlog.py's rows: broker, seconds, phase, pid, RssAnon, RssFile, VmRSS (KiB). Layout
and ticks are rss_chart.py's; standard library only.
"""

import argparse
import csv
from collections import defaultdict
from xml.sax.saxutils import escape

from rss_chart import COLOURS, MARGIN_BOTTOM, MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, axes

PANEL_WIDTH, PANEL_HEIGHT = 620, 340
PHASE_FILLS = ["#f3f6fb", "#fbf6ee"]
LINES = [("RssAnon", 3, "", 2), ("RssFile", 4, "7 4", 2)]  # name, column of a row, dash, width


def phases_of(rows):
    """[(phase, first seconds, last seconds)] in order, from rows of (seconds, phase, ...)."""
    spans = []
    for seconds, phase, *_ in rows:
        if spans and spans[-1][0] == phase:
            spans[-1][2] = seconds
        else:
            spans.append([phase, seconds, seconds])
    # Each phase runs until the next one begins.
    for current, following in zip(spans, spans[1:]):
        current[2] = following[1]
    return spans


def panel(broker, rows, colour, y_max, budget_mib, left):
    x_max = max(row[0] for row in rows) or 1
    plot_w = PANEL_WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = PANEL_HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
    x0, y0 = left + MARGIN_LEFT, MARGIN_TOP + plot_h

    def xy(t, m):
        return x0 + t / x_max * plot_w, y0 - m / y_max * plot_h

    out = [
        f'<text x="{x0 + plot_w / 2}" y="{MARGIN_TOP - 26}" text-anchor="middle" '
        f'font-weight="bold">{escape(broker)}</text>'
    ]
    for index, (phase, start, end) in enumerate(phases_of(rows)):
        xa, _ = xy(start, 0)
        xb, _ = xy(end, 0)
        out.append(
            f'<rect x="{xa:.1f}" y="{MARGIN_TOP}" width="{max(xb - xa, 0.5):.1f}" height="{plot_h}" '
            f'fill="{PHASE_FILLS[index % 2]}"/>'
            f'<line x1="{xa:.1f}" y1="{MARGIN_TOP}" x2="{xa:.1f}" y2="{y0}" stroke="#bbb" '
            f'stroke-dasharray="2 3"/>'
        )
        # Names alternate between two rows so that short phases do not overlap.
        if xb - xa >= 4:
            out.append(
                f'<text x="{(xa + xb) / 2:.1f}" y="{MARGIN_TOP - 4 - 11 * (index % 2)}" '
                f'text-anchor="middle" font-size="10" fill="#555">{escape(phase)}</text>'
            )
    out.append(
        f'<rect x="{x0}" y="{MARGIN_TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>'
    )
    axes(out, xy, (x0, y0, plot_w, plot_h, left), (x_max, y_max), "MiB", "#e4e4e4")
    if budget_mib and broker.startswith("stompd"):
        _, y = xy(0, budget_mib)
        out.append(
            f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + plot_w}" y2="{y:.1f}" stroke="#555" '
            f'stroke-dasharray="6 4"/>'
            f'<text x="{x0 + 4}" y="{y - 5:.1f}" fill="#555">--memory-bytes-max {budget_mib:g} MiB</text>'
        )
    # The kill -9: where the process changes.
    for before, after in zip(rows, rows[1:]):
        if before[2] != after[2]:
            x, _ = xy((before[0] + after[0]) / 2, 0)
            out.append(
                f'<line x1="{x:.1f}" y1="{MARGIN_TOP}" x2="{x:.1f}" y2="{y0}" stroke="#c00"/>'
                f'<text x="{x + 3:.1f}" y="{MARGIN_TOP + 12}" fill="#c00" font-size="10">kill -9</text>'
            )
    for _name, column, dash, width in LINES:
        # Each process its own line.
        segments, last = [[]], None
        for row in rows:
            if last is not None and row[2] != last:
                segments.append([])
            segments[-1].append(xy(row[0], row[column]))
            last = row[2]
        for points in segments:
            if points:
                path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
                out.append(
                    f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="{width}"'
                    + (f' stroke-dasharray="{dash}"' if dash else "")
                    + "/>"
                )
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("samples")
    parser.add_argument("out")
    parser.add_argument("--budget-mib", type=float, default=0)
    parser.add_argument("--title", default="Broker memory with a deep backlog")
    args = parser.parse_args()

    # broker -> [(seconds, phase, pid, RssAnon MiB, RssFile MiB, VmRSS MiB)], brokers as first seen.
    data = defaultdict(list)
    with open(args.samples, newline="") as samples:
        for broker, seconds, phase, pid, anon, mapped, rss in csv.reader(samples):
            mib = (int(kib) / 1024 for kib in (anon, mapped, rss))
            data[broker].append((float(seconds), phase, pid, *mib))
    columns = [column for _name, column, _dash, _width in LINES]
    y_max = max([row[c] for rows in data.values() for row in rows for c in columns] + [args.budget_mib, 1])
    y_max *= 1.1

    width = PANEL_WIDTH * max(len(data), 1)
    height = PANEL_HEIGHT + 40
    body = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        # Shrunk to fit one panel's width (about 0.55 em per character of a sans-serif face).
        f'<text x="{width / 2}" y="16" text-anchor="middle" '
        f'font-size="{min(14, width / (0.55 * max(len(args.title), 1))):.1f}">{escape(args.title)}</text>',
    ]
    for index, (broker, rows) in enumerate(data.items()):
        body += panel(broker, rows, COLOURS[index % len(COLOURS)], y_max, args.budget_mib, index * PANEL_WIDTH)
    x = 16
    for name, _column, dash, width_px in LINES:
        body.append(
            f'<line x1="{x}" y1="{height - 14}" x2="{x + 30}" y2="{height - 14}" stroke="#333" '
            f'stroke-width="{width_px}"' + (f' stroke-dasharray="{dash}"' if dash else "") + "/>"
            f'<text x="{x + 36}" y="{height - 10}">{escape(name)}'
            f"{' (anonymous)' if name == 'RssAnon' else ' (mapped file pages)'}</text>"
        )
        x += 230
    body.append("</svg>")
    with open(args.out, "w") as out:
        out.write("\n".join(body) + "\n")


if __name__ == "__main__":
    main()
