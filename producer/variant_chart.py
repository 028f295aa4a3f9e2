"""The chart of a job report: each variant's latency against its fidelity, drawn with plotly.

x is the variant's p50 latency as a ratio of fp32's (the paired ``ratio`` the select stage
records, with its interval as error bars; for jobs recorded before that, p50 / fp32's p50; p50 ms
when fp32 was not measured), y its cosine-min against the source model, bubble area its size,
colour its verdict; a dashed rule is the gate. Hover shows every figure of a variant.

Why plotly: the report must open offline from one HTML file, so the library's JS is embedded in
it (``include_plotlyjs=True``, no CDN), and its annotations take pixel offsets from their point,
so ``producer.label_layout`` can put each label where no other label, marker or the gate covers
it. The frame has a fixed size and fixed margins for the same reason: the placer needs to know
where each point lands on screen.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

import plotly.graph_objects as go

from producer.label_layout import Box, Marker, place_labels
from producer.render import human_bytes
from shared.jobspec import BASELINE

VERDICT_COLOURS = {"selected": "#1a9850", "candidate": "#91cf60", "baseline": "#4575b4", "rejected": "#d73027"}
OTHER_COLOUR = "#878787"
SANS = "Liberation Sans, Arial, Helvetica, sans-serif"
MONO = "DejaVu Sans Mono, Menlo, Consolas, Liberation Mono, monospace"  # label widths are predictable
LABEL_FONT_PX = 12
CHAR_PX = 0.62 * LABEL_FONT_PX  # every monospace face above is 0.55-0.61 em wide
LABEL_HEIGHT_PX = 26.0  # one line plus border and padding
# The figure's pixel size is fixed (labels are placed in pixels); a report's data never leaves the file.
CONFIG = {"displaylogo": False, "responsive": False,
          "modeBarButtonsToRemove": ["select2d", "lasso2d", "sendChartToCloud"]}


@dataclass(frozen=True)
class Frame:
    """Where the plot area lies in the figure and which data ranges it shows."""

    x_range: tuple[float, float]
    y_range: tuple[float, float]
    width: int = 1000
    height: int = 600
    left: int = 80
    right: int = 170  # the verdict legend sits in this margin
    top: int = 96
    bottom: int = 64

    @property
    def plot(self) -> Box:
        return Box(self.left, self.top, self.width - self.right, self.height - self.bottom)

    def px(self, x: float) -> float:
        x0, x1 = self.x_range
        return self.left + (x - x0) / (x1 - x0) * (self.plot.right - self.plot.left)

    def py(self, y: float) -> float:
        y0, y1 = self.y_range
        return self.top + (y1 - y) / (y1 - y0) * (self.plot.bottom - self.plot.top)


@dataclass(frozen=True)
class Point:
    """One measured variant as plotted."""

    row: dict
    x: float
    y: float
    low: float | None  # the ratio's interval, when the job recorded one
    high: float | None
    radius: float  # px

    @property
    def label(self) -> str:
        return f"{self.row['variant']} · {human_bytes(self.row.get('size_bytes'))}"


def chart_html(job: dict, rows: list[dict], gate: float | None) -> str:
    """The chart as an HTML fragment with plotly's JS inside; a sentence when nothing was measured."""
    figure = variant_figure(job, rows, gate)
    if figure is None:
        return "<p>No measured variants.</p>"
    return figure.to_html(full_html=False, include_plotlyjs=True, div_id="variant-chart", config=CONFIG)


def variant_figure(job: dict, rows: list[dict], gate: float | None) -> go.Figure | None:
    ratio_axis, points = plotted_points(rows)
    if not points:
        return None
    frame = frame_for(points, gate, ratio_axis)
    markers = [Marker(frame.px(p.x), frame.py(p.y), p.radius) for p in points]
    annotations, shapes, gate_boxes = gate_marks(frame, gate, markers)
    soft = [Box(frame.px(p.low), m.y - 3, frame.px(p.high), m.y + 3)
            for p, m in zip(points, markers) if p.low is not None and p.high is not None]
    if ratio_axis:
        shapes.append(dict(type="line", xref="x", x0=1, x1=1, yref="paper", y0=0, y1=1, layer="below",
                           line=dict(color="#bbbbbb", width=1, dash="dot")))
    sizes = [(label_width(p.label), LABEL_HEIGHT_PX) for p in points]
    boxes = place_labels(markers, sizes, _shrunk(frame.plot, 2), obstacles=gate_boxes[:1], soft=gate_boxes[1:] + soft)
    annotations += [label_annotation(p, m, box) for p, m, box in zip(points, markers, boxes)]
    figure = go.Figure([_trace(group, [p for p in points if verdict_group(p.row) == group])
                        for group in dict.fromkeys(verdict_group(p.row) for p in points)])
    figure.update_layout(
        width=frame.width, height=frame.height, template="plotly_white", font=dict(family=SANS, size=13),
        margin=dict(l=frame.left, r=frame.right, t=frame.top, b=frame.bottom, autoexpand=False),
        title=dict(text=html.escape(chart_title(job, rows)), x=0.01, xanchor="left", font=dict(size=18),
                   subtitle=dict(text=html.escape(chart_subtitle(rows, ratio_axis)), font=dict(size=12))),
        xaxis=dict(range=list(frame.x_range), automargin=False, zeroline=False, showline=True,
                   linecolor="#444444", mirror=True,
                   title=dict(text="p50 latency ÷ fp32's p50 (left of 1 is faster)" if ratio_axis
                              else "p50 latency (ms)"), ticksuffix="×" if ratio_axis else ""),
        yaxis=dict(range=list(frame.y_range), automargin=False, zeroline=False, showline=True,
                   linecolor="#444444", mirror=True, title=dict(text="cosine-min vs source model")),
        legend=dict(title=dict(text="verdict"), x=1.02, xanchor="left", y=1, yanchor="top", itemclick=False,
                    itemdoubleclick=False),
        hovermode="closest", hoverlabel=dict(bgcolor="white", font=dict(family=SANS, size=12)),
        annotations=annotations, shapes=shapes,
    )
    return figure


def label_annotation(point: Point, marker: Marker, box: Box) -> dict:
    """The point's label, centred on ``box`` and tied to the point by a leader line."""
    cx, cy = box.centre
    return dict(x=point.x, y=point.y, xref="x", yref="y", ax=cx - marker.x, ay=cy - marker.y, axref="pixel",
                ayref="pixel", xanchor="center", yanchor="middle", text=html.escape(point.label), showarrow=True,
                arrowhead=0, arrowwidth=1, arrowcolor="#666666", standoff=point.radius, borderpad=3, borderwidth=1,
                bordercolor=verdict_colour(point.row), bgcolor="rgba(255,255,255,0.9)",
                font=dict(family=MONO, size=LABEL_FONT_PX, color="#222222"))


def plotted_points(rows: list[dict]) -> tuple[bool, list[Point]]:
    """(whether x is a ratio to fp32, the measured variants): p50 ms only where no ratio can be had."""
    measured = [r for r in rows if r.get("p50_ms") is not None and r.get("cosine_min") is not None]
    base = next((r["p50_ms"] for r in measured if r.get("verdict") == "baseline" or r["variant"] == BASELINE), None)
    ratios = [r.get("ratio") if r.get("ratio") is not None else (r["p50_ms"] / base if base else None)
              for r in measured]
    ratio_axis = all(ratio is not None for ratio in ratios)
    biggest = max((r.get("size_bytes") or 0 for r in measured), default=0)
    points = []
    for row, ratio in zip(measured, ratios):
        interval = ratio_axis and row.get("ratio_low") is not None and row.get("ratio_high") is not None
        size = row.get("size_bytes") or 0
        points.append(Point(row, x=ratio if ratio_axis else row["p50_ms"], y=row["cosine_min"],
                            low=row["ratio_low"] if interval else None, high=row["ratio_high"] if interval else None,
                            radius=6 + 13 * math.sqrt(size / biggest) if biggest else 6))  # area ~ size
    return ratio_axis, points


def frame_for(points: list[Point], gate: float | None, ratio_axis: bool) -> Frame:
    """Ranges that keep every bubble, error bar and the gate inside the plot with room for labels."""
    pad = max(p.radius for p in points) + 30
    xs = [v for p in points for v in (p.x, p.low, p.high) if v is not None] + ([1.0] if ratio_axis else [])
    ys = [p.y for p in points] + ([gate] if gate is not None else [])
    size = Frame((0, 1), (0, 1))
    x_range = _padded(min(xs), max(xs), size.plot.right - size.plot.left, pad, 0.1 if ratio_axis else 0.2 * max(xs))
    y_range = _padded(min(ys), max(ys), size.plot.bottom - size.plot.top, pad, 0.004)
    return Frame(x_range, y_range)


def gate_marks(frame: Frame, gate: float | None, markers: list[Marker]) -> tuple[list, list, list[Box]]:
    """The gate's label and rule, and the boxes they take: the label's first, then the rule's."""
    if gate is None:
        return [], [], []
    text = f"gate: cosine-min ≥ {gate:g}"
    width, y = label_width(text), frame.py(gate)
    plot = frame.plot
    spots = [Box(left, top, left + width, top + LABEL_HEIGHT_PX)
             for left in (plot.right - width - 6, plot.left + 6, (plot.left + plot.right - width) / 2)
             for top in (y - LABEL_HEIGHT_PX - 3, y + 3)]
    spots = [spot for spot in spots if spot.inside(plot)] or spots
    label = next((s for s in spots if not any(s.overlap(m.box, 3) for m in markers)), spots[0])
    cx, cy = label.centre
    annotation = dict(x=(cx - plot.left) / (plot.right - plot.left), xref="paper", y=_data_y(frame, cy), yref="y",
                      xanchor="center", yanchor="middle", text=html.escape(text), showarrow=False,
                      font=dict(family=MONO, size=LABEL_FONT_PX, color="#555555"), borderpad=3)
    rule = dict(type="line", xref="paper", x0=0, x1=1, yref="y", y0=gate, y1=gate,
                line=dict(color="#777777", width=1.5, dash="dash"))
    return [annotation], [rule], [label, Box(plot.left, y - 2, plot.right, y + 2)]


def chart_title(job: dict, rows: list[dict]) -> str:
    return f"{job.get('model') or 'job ' + str(job.get('id', ''))} variants · hardware: {hardware_class(rows)}"


def chart_subtitle(rows: list[dict], ratio_axis: bool) -> str:
    cpus = sorted({hw["cpu"] for hw in _hardware(rows) if hw.get("cpu")})
    parts = [", ".join(cpus)] if cpus else []
    if ratio_axis and not any(r.get("ratio") is not None for r in rows):
        parts.append("ratios from separate timings, not paired")
    if ratio_axis and any(r.get("ratio_low") is not None for r in rows):
        parts.append("bars: the ratio's interval")
    parts.append("bubble area: model size · hover a point for its figures")
    return " · ".join(parts)


def hardware_class(rows: list[dict]) -> str:
    """The class the variants were measured on; old jobs did not record one."""
    classes = sorted({str(hw.get("class")) for hw in _hardware(rows) if hw.get("class")})
    if not classes:
        return "not recorded"
    return classes[0] if len(classes) == 1 else f"mixed ({', '.join(classes)})"


def hover_text(row: dict) -> str:
    def num(key: str, spec: str, suffix: str = "") -> str:
        return "-" if row.get(key) is None else format(row[key], spec) + suffix

    esc = html.escape
    lines = [f"<b>{esc(row['variant'])}</b> · {esc(str(row.get('verdict', '-')))}",
             f"p50 {num('p50_ms', '.2f', ' ms')} · p95 {num('p95_ms', '.2f', ' ms')}"]
    if row.get("ratio") is not None or row.get("speedup"):
        ratio = row["ratio"] if row.get("ratio") is not None else 1 / row["speedup"]
        interval = (f" [{row['ratio_low']:.3f}, {row['ratio_high']:.3f}]"
                    if row.get("ratio_low") is not None and row.get("ratio_high") is not None else "")
        rounds = f" · {row['rounds']} rounds" if row.get("rounds") is not None else ""
        lines.append(f"ratio vs fp32 {ratio:.3f}×{interval}{rounds}")
    elif verdict_group(row) == "baseline":
        lines.append("ratio vs fp32 1× (the reference)")
    lines.append(f"size {human_bytes(row.get('size_bytes'))}"
                 + (f" ({row['size_ratio']:.2f}× fp32)" if row.get("size_ratio") is not None else ""))
    lines.append(f"cosine min {num('cosine_min', '.4f')} · mean {num('cosine_mean', '.4f')}")
    hardware = row.get("hardware") or {}
    if hardware:
        isa = hardware.get("isa")
        isa = ", ".join(map(str, isa)) if isinstance(isa, list) else isa
        shown = (hardware.get("class"), hardware.get("cpu"), isa)
        lines.append("hardware " + esc(" · ".join(str(v) for v in shown if v)))
    return "<br>".join(lines)


def verdict_group(row: dict) -> str:
    """``selected``, ``candidate``, ``baseline``, ``rejected``: the verdict without its reason."""
    return str(row.get("verdict") or "unknown").split(":")[0].split(" (")[0].strip()


def verdict_colour(row: dict) -> str:
    return VERDICT_COLOURS.get(verdict_group(row), OTHER_COLOUR)


def label_width(text: str) -> float:
    return len(text) * CHAR_PX + 12  # border and padding


def _trace(group: str, points: list[Point]) -> go.Scatter:
    intervals = any(p.low is not None for p in points)
    return go.Scatter(
        x=[p.x for p in points], y=[p.y for p in points], mode="markers", name=group, cliponaxis=False,
        marker=dict(size=[2 * p.radius for p in points], color=VERDICT_COLOURS.get(group, OTHER_COLOUR),
                    opacity=0.7, line=dict(color="#333333", width=1)),
        error_x=dict(type="data", symmetric=False, visible=intervals, color="#555555", thickness=1.5, width=4,
                     array=[p.high - p.x if p.high is not None else None for p in points],
                     arrayminus=[p.x - p.low if p.low is not None else None for p in points]),
        hovertext=[hover_text(p.row) for p in points], hovertemplate="%{hovertext}<extra></extra>",
    )


def _hardware(rows: list[dict]) -> list[dict]:
    return [row["hardware"] for row in rows if isinstance(row.get("hardware"), dict)]


def _padded(low: float, high: float, pixels: float, pad_px: float, min_span: float) -> tuple[float, float]:
    """A range around [low, high] that leaves ``pad_px`` of the axis's ``pixels`` free at each end."""
    span = max(high - low, min_span)
    total = span / (1 - 2 * pad_px / pixels)
    middle = (low + high) / 2
    return middle - total / 2, middle + total / 2


def _data_y(frame: Frame, py: float) -> float:
    y0, y1 = frame.y_range
    return y1 - (py - frame.top) / (frame.plot.bottom - frame.plot.top) * (y1 - y0)


def _shrunk(box: Box, by: float) -> Box:
    return Box(box.left + by, box.top + by, box.right - by, box.bottom - by)
