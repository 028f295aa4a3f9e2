"""The report chart without a browser: label placement, and what the figure shows for new and old jobs.

tests/browser/test_report_chart.py checks the same chart as Chromium lays it out.
"""

from __future__ import annotations

import itertools
import re

import pytest

from producer.label_layout import Box, Marker, crosses, place_labels
from producer.report import html_report
from producer.variant_chart import chart_html, hardware_class, hover_text, variant_figure, verdict_group

AREA = Box(80, 96, 830, 536)
HARDWARE = {"class": "avx2", "cpu": "AMD EPYC 7B13", "isa": ["avx2", "fma"]}


def paired(variant: str, verdict: str, ratio: float, cosine: float, size: int, **extra) -> dict:
    """A row as the select stage records it with paired measurement."""
    return {"variant": variant, "verdict": verdict, "p50_ms": 150 * ratio, "p95_ms": 160 * ratio, "ratio": ratio,
            "ratio_low": ratio - 0.02, "ratio_high": ratio + 0.02, "rounds": 24, "cosine_min": cosine,
            "cosine_mean": cosine, "size_bytes": size, "hardware": HARDWARE, **extra}


def recorded_before(variant: str, verdict: str, p50: float, cosine: float | None, size: int) -> dict:
    """A row of a job recorded before ratios, intervals and hardware were."""
    return {"variant": variant, "verdict": verdict, "p50_ms": p50, "cosine_min": cosine, "size_bytes": size}


def job(rows: list[dict], gate: float | None = 0.99) -> dict:
    optimize = {"gate": {"cosine_min": gate}} if gate is not None else {}
    return {"id": "j1", "model": "minilm", "state": "SUCCEEDED", "spec": {"optimize": optimize},
            "stages": {"select": {"table": rows}}}


def assert_apart(boxes: list[Box], markers: list[Marker], area: Box) -> None:
    for box in boxes:
        assert box.inside(area), box
        assert not any(box.overlap(m.box) for m in markers), box
    for one, other in itertools.combinations(boxes, 2):
        assert not one.overlap(other), (one, other)


@pytest.mark.parametrize("count", [3, 6, 10])
def test_labels_of_markers_on_one_spot_clear_each_other_and_every_marker(count):
    markers = [Marker(780, 120, 18)] * count  # a corner: most spots around it are outside the area

    boxes = place_labels(markers, [(140, 26)] * count, AREA)

    assert_apart(boxes, markers, AREA)


def test_labels_keep_off_obstacles_and_give_up_soft_ones_only_when_needed():
    marker = Marker(400, 300, 10)
    gate_label = Box(300, 270, 500, 296)  # right above the marker
    error_bar = Box(300, 297, 700, 303)

    box, = place_labels([marker], [(100, 26)], AREA, obstacles=[gate_label], soft=[error_bar])

    assert not box.overlap(gate_label) and not box.overlap(error_bar)


def test_a_leader_crosses_a_box_only_where_it_passes_through_it():
    label = Box(40, 40, 60, 60)

    assert crosses(((0, 0), (100, 100)), label) and crosses(((50, 0), (50, 45)), label)
    assert not crosses(((0, 0), (100, 0)), label) and not crosses(((0, 0), (30, 30)), label)


def test_a_paired_job_shows_intervals_hardware_and_the_gate():
    rows = [paired("fp32", "baseline", 1.0, 1.0, 90_000_000, ratio_low=None, ratio_high=None),
            paired("int8-dynamic", "selected", 0.72, 0.9931, 23_000_000)]

    figure = variant_figure(job(rows), rows, 0.99)

    assert "hardware: avx2" in figure.layout.title.text and "AMD EPYC 7B13" in figure.layout.title.subtitle.text
    assert [trace.name for trace in figure.data] == ["baseline", "selected"]
    selected = figure.data[1]
    assert selected.error_x.visible and selected.error_x.array == pytest.approx([0.02])
    assert [shape.y0 for shape in figure.layout.shapes if shape.y0 == shape.y1] == [0.99]
    assert "gate: cosine-min ≥ 0.99" in [a.text for a in figure.layout.annotations]


def test_a_job_recorded_before_paired_ratios_plots_p50_over_fp32s_and_says_so():
    rows = [recorded_before("fp32", "baseline", 150.0, 1.0, 90_000_000),
            recorded_before("fp16", "candidate", 75.0, 0.9999, 45_000_000),
            recorded_before("int8", "rejected: could not convert", 60.0, None, 23_000_000)]

    figure = variant_figure(job(rows), rows, 0.99)

    assert figure.layout.title.text.endswith("hardware: not recorded")
    assert "not paired" in figure.layout.title.subtitle.text
    assert sorted(x for trace in figure.data for x in trace.x) == [0.5, 1.0]  # int8 has no fidelity to plot
    assert not any(trace.error_x.visible for trace in figure.data)


def test_without_fp32_latency_x_is_p50_in_milliseconds():
    rows = [recorded_before("fp16", "selected", 75.0, 0.9999, 45_000_000)]

    figure = variant_figure(job(rows, gate=None), rows, None)

    assert figure.layout.xaxis.title.text == "p50 latency (ms)" and list(figure.data[0].x) == [75.0]
    assert not figure.layout.shapes


def test_hover_shows_every_figure_and_degrades_for_old_rows():
    new = hover_text(paired("int8-dynamic", "selected", 0.72, 0.9931, 23_100_000, size_ratio=0.25))
    old = hover_text({**recorded_before("fp16", "candidate", 75.0, 0.9999, 45_000_000), "speedup": 2.0})

    for figure in ("<b>int8-dynamic</b> · selected", "p50 108.00 ms · p95 115.20 ms",
                   "ratio vs fp32 0.720× [0.700, 0.740] · 24 rounds", "size 23.1 MB (0.25× fp32)",
                   "cosine min 0.9931 · mean 0.9931", "hardware avx2 · AMD EPYC 7B13 · avx2, fma"):
        assert figure in new
    assert "ratio vs fp32 0.500×<br>" in old and "p95 -" in old and "hardware" not in old


def test_hardware_of_variants_measured_on_different_classes_is_called_mixed():
    rows = [{"hardware": {"class": "avx2"}}, {"hardware": {"class": "avx512_vnni"}}, {}]

    assert hardware_class(rows) == "mixed (avx2, avx512_vnni)"


def test_a_verdict_groups_by_its_first_word():
    assert verdict_group({"verdict": "rejected: slower than fp32 (297.5 ms vs 148.4 ms)"}) == "rejected"
    assert verdict_group({}) == "unknown"


def test_the_html_report_embeds_the_charts_js_and_loads_nothing_from_elsewhere():
    rows = [paired("fp32", "baseline", 1.0, 1.0, 90_000_000)]

    page = html_report(job(rows))

    assert 'id="variant-chart"' in page and "Plotly.newPlot" in page
    assert not [tag for tag in re.findall(r"<script[^>]*>", page) if "src=" in tag]
    assert not re.findall(r"<link[^>]*>", page)


def test_a_job_with_no_measured_variant_gets_a_sentence_not_a_chart():
    rows = [recorded_before("fp32", "rejected: could not convert", None, None, 1000)]

    assert chart_html(job(rows), rows, 0.99) == "<p>No measured variants.</p>"
