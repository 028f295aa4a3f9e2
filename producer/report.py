"""The variant report of a job: the table as JSON, and one self-contained HTML page with a chart.

The chart (``producer.variant_chart``) plots each variant's latency against its fidelity with the
gate as a rule; the page embeds its JS, so a report opens offline, e.g. attached to a ticket.
"""

from __future__ import annotations

import html
import json

from producer.render import accuracy_cell, human_bytes, quantization_line, ratio_cell
from producer.variant_chart import chart_html


def variant_rows(job: dict) -> list[dict]:
    return job.get("stages", {}).get("select", {}).get("table") or []


def html_report(job: dict) -> str:
    rows = variant_rows(job)
    gate = (job.get("spec", {}).get("optimize") or {}).get("gate", {}).get("cosine_min")
    header = ["variant", "size", "size ratio", "p50 ms", "p95 ms", "vs fp32 (interval)", "rounds", "speed",
              "cosine min (gate)", "cosine mean (gate)", "max abs (gate)", "cosine min (calibration)", "accuracy",
              "hardware", "verdict", "quantization"]
    body = []
    for r in rows:
        cells = [r["variant"], human_bytes(r.get("size_bytes")), _num(r.get("size_ratio"), ".2f"),
                 _num(r.get("p50_ms"), ".1f"), _num(r.get("p95_ms"), ".1f"), ratio_cell(r), _num(r.get("rounds"), "d"),
                 r.get("speed") or "-", _num(r.get("cosine_min"), ".4f"), _num(r.get("cosine_mean"), ".4f"),
                 _num(r.get("max_abs"), ".3g"), _num(r.get("calibration_cosine_min"), ".4f"), accuracy_cell(r),
                 r.get("hardware_class") or "-", r.get("verdict", "-"),
                 quantization_line(r["quantization"]) if r.get("quantization") else "-"]
        body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    title = html.escape(f"modelyard job {job['id']} · {job.get('model', '')} · {job['state']}")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,td:nth-last-child(-n+2){text-align:left}"
        f"</style></head><body><h1>{title}</h1>{chart_html(job, rows, gate)}"
        "<table><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>" + "".join(body) + "</table>"
        f"<h2>JSON</h2><pre>{html.escape(json.dumps(rows, indent=1))}</pre></body></html>"
    )


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
