"""A quantize report as one self-contained HTML page (`--report FILE.html`): no script, nothing
fetched; inline CSS, an inline SVG chart of each layer's SQNRs by depth, then the report's tables,
facts, summary and warnings (the parts report.py lays out, as the Markdown renderer draws them).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Callable

from .files import write_atomic
from .report import LINE_CHARS, QuantizeReport, shown

__all__ = ["to_html", "write_html"]


def _chart_svg(report: QuantizeReport, width: int = 900, height: int = 360) -> str:
    """An inline SVG line chart, by depth (the layer's index in module order): each layer's weight
    SQNR, and where measured its output SQNR and its sensitivity (the model's output SQNR with it
    alone quantized, from --min-sqnr or --sensitivity: `QuantizeReport.sensitivity_db`). A layer
    kept float has a grey band behind it (its points are what int8 gave it); an exact layer
    (999 dB) is clipped to the top of the axis. Where layers were rounded otherwise than to
    nearest (GPTQ, AWQ), each point names its layer's method and a series shows the output SQNR
    round-to-nearest gave the same layers."""
    sensitivity = report.sensitivity_db()
    rounded = report.rounded()  # GPTQ/AWQ: each point names its layer's method, beside round-to-nearest's output SQNR
    series = [
        ("weight SQNR", "#1f77b4", [r.weight_sqnr_db for r in report.layers]),
        ("output SQNR", "#ff7f0e", [r.output_sqnr_db for r in report.layers]),
        *([("output SQNR, round to nearest", "#9467bd", [r.rtn_output_sqnr_db for r in report.layers])] if rounded else []),
        ("sensitivity (model output SQNR, layer alone int8)", "#2ca02c", [sensitivity.get(r.name) for r in report.layers]),
    ]
    series = [(n, c, [None if v is None or not math.isfinite(v) else v for v in vals]) for n, c, vals in series]
    series = [s for s in series if any(v is not None for v in s[2])]
    values = [v for _, _, vals in series for v in vals if v is not None]
    left, right, top, bottom = 56, 16, 40, 44
    pw, ph = width - left - right, height - top - bottom
    lo = 0.0 if not values else min(0.0, math.floor(min(values) / 10) * 10)
    hi = 10.0 if not values else max(lo + 10, math.ceil(min(max(values), 120) / 10) * 10)
    n = max(len(report.layers), 1)

    def x(i: int) -> float:
        return left + (pw * (i + 0.5) / n)

    def y(v: float) -> float:
        return top + ph * (1 - (min(v, hi) - lo) / (hi - lo))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             'role="img" aria-label="SQNR by depth" font-family="sans-serif" font-size="12">',
             f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>']
    step = 10 if hi - lo <= 80 else 20
    for t in range(int(lo), int(hi) + 1, step):
        parts.append(f'<line x1="{left}" y1="{y(t):.1f}" x2="{width - right}" y2="{y(t):.1f}" stroke="#dddddd"/>'
                     f'<text x="{left - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{t}</text>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#333333"/>'
                 f'<line x1="{left}" y1="{top + ph}" x2="{width - right}" y2="{top + ph}" stroke="#333333"/>')
    parts.append(f'<text x="16" y="{top + ph / 2:.0f}" transform="rotate(-90 16 {top + ph / 2:.0f})" text-anchor="middle">dB</text>'
                 f'<text x="{left + pw / 2:.0f}" y="{height - 8}" text-anchor="middle">layer depth (module order, 0 .. {n - 1})</text>')
    lx = left + 10
    floats = [i for i, r in enumerate(report.layers) if r.status != "quantized"]
    for i in floats:  # a band behind each layer kept float: its SQNRs are what int8 gave
        parts.append(f'<rect x="{x(i) - pw / (2 * n):.1f}" y="{top}" width="{pw / n:.1f}" height="{ph}" fill="#e8e8e8">'
                     f'<title>{html.escape(report.layers[i].name)}: kept float</title></rect>')
    if floats:
        parts.append(f'<rect x="{lx}" y="12" width="14" height="14" fill="#e8e8e8" stroke="#999999"/>'
                     f'<text x="{lx + 20}" y="24">kept float</text>')
        lx += 20 + 7 * len("kept float") + 24
    for name, color, vals in series:
        labels = [f"{r.name} ({r.rounding or 'float'})" if rounded else r.name for r in report.layers]
        parts += _series_svg(name, color, vals, labels, x, y)
        parts.append(f'<rect x="{lx}" y="12" width="14" height="14" fill="{color}"/>'
                     f'<text x="{lx + 20}" y="24">{html.escape(name)}</text>')
        lx += 20 + 7 * len(name) + 24  # ~7 px a character at 12 px
    parts.append("</svg>")
    return "".join(parts)


def _series_svg(name: str, color: str, values: list[float | None], layers: list[str],
                x: Callable[[int], float], y: Callable[[float], float]) -> list[str]:
    """One series of the chart: a line through each run of measured `values` (None: a gap) and
    a point per value that names its layer, at `(x(depth), y(dB))`."""
    runs, run, parts = [], [], []
    for i, v in enumerate(values):
        if v is None:
            runs, run = runs + ([run] if run else []), []
        else:
            run.append((x(i), y(v)))
    runs += [run] if run else []
    for r in runs:
        pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in r)
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>')
    for i, v in enumerate(values):
        if v is not None:
            parts.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="3" fill="{color}">'
                         f'<title>{html.escape(layers[i])}: {name} {v:.2f} dB</title></circle>')
    return parts


def to_html(report: QuantizeReport) -> str:
    """The quantize report as one self-contained HTML page: no script, nothing fetched (inline
    CSS and an inline SVG chart of the SQNRs by depth), then the layer table, the summary."""
    esc = html.escape
    rows = []
    for t in report.tables():
        head = "".join(f"<th>{esc(c)}</th>" for c in t.columns)
        body = "".join(
            "<tr>" + "".join(f'<td class="{"num" if c in t.numeric else ""}">{esc(str(v))}</td>' for c, v in zip(t.columns, row)) + "</tr>"
            for row in t.rows
        )
        rows.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    items = "".join(f"<li>{esc(shown(line, LINE_CHARS))}</li>" for line in (*report.facts(), *report.summary(), *report.warnings()))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{esc(report.title)}</title>"
        "<style>body{font-family:sans-serif;margin:16px;color:#222}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:2px 6px}td.num{text-align:right}th{background:#f4f4f4}</style>"
        f"</head><body><h1>{esc(report.title)}</h1>"
        f"<p>{esc(report.source_kind)}; config: {esc(json.dumps(report.config.to_dict(), sort_keys=True))}</p>"
        f'<figure id="chart">{_chart_svg(report)}</figure><ul>{items}</ul>{"".join(rows)}</body></html>\n'
    )


def write_html(report: QuantizeReport, path: Path, *, force: bool) -> Path:
    """Write the page `to_html` gives at `path`, atomically."""
    return write_atomic(path, to_html(report).encode(), force=force)
