"""The variant report of a job: the table as JSON, and an HTML page with a latency/size/fidelity chart.

The chart is a hand-written SVG scatter (no plotting dependency): x = p50 latency, y = cosine
min against the source model, bubble area = model size, colour = verdict; the gate is drawn as
a horizontal line so a reader sees at once what passed and what was traded.
"""

from __future__ import annotations

import html
import json
import math

from producer.render import accuracy_cell, human_bytes

COLOURS = {"selected": "#1a9850", "candidate": "#91cf60", "baseline": "#4575b4"}
REJECTED = "#d73027"
W, H, PAD = 720, 420, 60


def variant_rows(job: dict) -> list[dict]:
    return job.get("stages", {}).get("select", {}).get("table") or []


def _colour(verdict: str) -> str:
    return COLOURS.get(verdict, REJECTED)


def chart_svg(rows: list[dict], gate: float | None) -> str:
    points = [r for r in rows if r.get("p50_ms") is not None and r.get("cosine_min") is not None]
    if not points:
        return "<p>No measured variants.</p>"
    xs = [r["p50_ms"] for r in points]
    ys = [r["cosine_min"] for r in points] + ([gate] if gate is not None else [])
    x_lo, x_hi = 0.0, max(xs) * 1.15
    y_lo, y_hi = min(ys) - 0.005, 1.0 + 0.002
    big = max(r["size_bytes"] for r in points)

    def sx(v: float) -> float:
        return PAD + (v - x_lo) / (x_hi - x_lo) * (W - 2 * PAD)

    def sy(v: float) -> float:
        return H - PAD - (v - y_lo) / (y_hi - y_lo) * (H - 2 * PAD)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
             f'font-size="12"><rect width="{W}" height="{H}" fill="white"/>',
             f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="black"/>',
             f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="black"/>',
             f'<text x="{W / 2}" y="{H - 15}" text-anchor="middle">p50 latency (ms)</text>',
             f'<text x="15" y="{H / 2}" transform="rotate(-90 15 {H / 2})" text-anchor="middle">'
             f"cosine min vs source</text>"]
    for i in range(6):
        xv = x_lo + (x_hi - x_lo) * i / 5
        yv = y_lo + (y_hi - y_lo) * i / 5
        parts.append(f'<text x="{sx(xv):.0f}" y="{H - PAD + 16}" text-anchor="middle">{xv:.0f}</text>')
        parts.append(f'<text x="{PAD - 6}" y="{sy(yv) + 4:.0f}" text-anchor="end">{yv:.3f}</text>')
    if gate is not None:
        parts.append(f'<line x1="{PAD}" y1="{sy(gate):.1f}" x2="{W - PAD}" y2="{sy(gate):.1f}" '
                     f'stroke="#999" stroke-dasharray="6 4"/><text x="{W - PAD}" y="{sy(gate) - 5:.1f}" '
                     f'text-anchor="end" fill="#666">gate {gate}</text>')
    for row in points:
        radius = 6 + 24 * math.sqrt(row["size_bytes"] / big)
        x, y = sx(row["p50_ms"]), sy(row["cosine_min"])
        label = html.escape(f"{row['variant']} · {human_bytes(row['size_bytes'])}")
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{radius:.1f}" fill="{_colour(row.get("verdict", ""))}" '
                     f'fill-opacity="0.6" stroke="black"><title>{label}</title></circle>')
        parts.append(f'<text x="{x + radius + 4:.1f}" y="{y + 4:.1f}">{label}</text>')
    parts.append("</svg>")
    return "".join(parts)


def html_report(job: dict) -> str:
    rows = variant_rows(job)
    gate = (job.get("spec", {}).get("optimize") or {}).get("gate", {}).get("cosine_min")
    header = ["variant", "size", "size ratio", "p50 ms", "p95 ms", "speedup", "cosine min", "cosine mean",
              "max abs", "accuracy", "worker", "verdict"]
    body = []
    for r in rows:
        cells = [r["variant"], human_bytes(r.get("size_bytes")), _num(r.get("size_ratio"), ".2f"),
                 _num(r.get("p50_ms"), ".1f"), _num(r.get("p95_ms"), ".1f"), _num(r.get("speedup"), ".2f"),
                 _num(r.get("cosine_min"), ".4f"), _num(r.get("cosine_mean"), ".4f"), _num(r.get("max_abs"), ".3g"),
                 accuracy_cell(r), r.get("worker", "-"), r.get("verdict", "-")]
        body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    title = html.escape(f"modelyard job {job['id']} · {job.get('model', '')} · {job['state']}")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,td:last-child{text-align:left}"
        f"</style></head><body><h1>{title}</h1>{chart_svg(rows, gate)}"
        "<table><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>" + "".join(body) + "</table>"
        f"<h2>JSON</h2><pre>{html.escape(json.dumps(rows, indent=1))}</pre></body></html>"
    )


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
