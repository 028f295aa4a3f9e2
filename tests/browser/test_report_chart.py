"""The report chart as a person sees it: Debian's Chromium opens ``modelyard report --html``'s file.

The job has five variants whose points crowd: fp32, graph and fp16 all measure ~1.0x fp32 at
cosine ~1.0, and int8-dynamic sits just above the 0.99 gate. The old hand-drawn chart printed
those labels and the gate's over each other; here every label's box, as Chromium lays it out,
must clear every other label and every marker and stay inside the plot area. Every request the
page makes is recorded: a report opens offline, so nothing but the file itself may be loaded.

Chromium is Debian's ``chromium`` package driven by Playwright's Python client (as in
test_flower.py); without ``/usr/bin/chromium`` these tests skip locally and fail under ``CI=true``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from producer.report import html_report

HARDWARE = {"class": "avx2", "cpu": "AMD EPYC 7B13", "isa": ["avx2", "fma"], "cores": 2}
GATE = 0.99


def variant(name: str, verdict: str, p50: float, ratio: float, interval: tuple[float, float] | None,
            cosine: float, size: int) -> dict:
    return {"variant": name, "verdict": verdict, "p50_ms": p50, "p95_ms": round(p50 * 1.05, 2),
            "ratio": ratio, "ratio_low": interval[0] if interval else None,
            "ratio_high": interval[1] if interval else None, "rounds": 24, "cosine_min": cosine,
            "cosine_mean": min(1.0, cosine + 0.004), "size_bytes": size, "hardware": HARDWARE}


CROWDED_JOB = {
    "id": "j5", "model": "minilm", "state": "SUCCEEDED",
    "spec": {"optimize": {"gate": {"cosine_min": GATE}}},
    "stages": {"select": {"table": [
        variant("fp32", "baseline", 148.4, 1.0, None, 1.0, 90_900_000),
        variant("graph", "candidate", 147.9, 0.997, (0.982, 1.012), 0.99999, 90_800_000),
        variant("fp16", "candidate", 149.5, 1.007, (0.991, 1.023), 0.99996, 45_500_000),
        variant("int8-dynamic", "selected", 106.8, 0.72, (0.70, 0.74), 0.9931, 23_100_000),
        variant("int8-static", f"rejected: cosine-min 0.9712 below the gate {GATE}", 96.5, 0.65, (0.62, 0.68),
                0.9712, 23_000_000),
    ]}},
}
VARIANTS = [row["variant"] for row in CROWDED_JOB["stages"]["select"]["table"]]


@dataclass(frozen=True)
class Rect:
    left: float
    top: float
    right: float
    bottom: float

    def intersects(self, other: Rect) -> bool:
        return (min(self.right, other.right) > max(self.left, other.left)
                and min(self.bottom, other.bottom) > max(self.top, other.top))

    def inside(self, outer: Rect) -> bool:
        return (self.left >= outer.left and self.top >= outer.top
                and self.right <= outer.right and self.bottom <= outer.bottom)




@dataclass
class OpenedReport:
    page: object  # playwright's Page
    requests: list[str]


@pytest.fixture(scope="module")
def report_file(tmp_path_factory) -> Path:
    """The crowded job's report, written as ``modelyard report --html`` writes it."""
    path = tmp_path_factory.mktemp("report") / "report.html"
    path.write_text(html_report(CROWDED_JOB))
    return path


@pytest.fixture
def report(browser, report_file) -> Iterator[OpenedReport]:
    """The report open in a fresh Chromium page."""
    path = report_file
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    requests: list[str] = []
    context.on("request", lambda request: requests.append(request.url))
    try:
        page = context.new_page()
        page.goto(path.as_uri())
        page.locator("#variant-chart .annotation").first.wait_for(timeout=30_000)
        yield OpenedReport(page, requests)
    finally:
        context.close()


def rects(page, selector: str) -> list[tuple[str, Rect]]:
    """(text, client rect) of each element the selector finds."""
    found = page.eval_on_selector_all(selector, "els => els.map(e => { const r = e.getBoundingClientRect(); "
                                                "return [e.textContent, r.left, r.top, r.right, r.bottom]; })")
    return [(text, Rect(*box)) for text, *box in found]


def test_crowded_labels_clear_each_other_and_the_markers_inside_the_plot(report, tmp_path):
    page = report.page
    page.screenshot(path=tmp_path / "report-chart.png", full_page=True)
    labels = rects(page, "#variant-chart .annotation-text-g")
    markers = rects(page, "#variant-chart .scatterlayer path.point")
    (_, plot), = rects(page, "#variant-chart .draglayer rect.nsewdrag")

    assert sorted(text.split(" · ")[0] for text, _ in labels) == sorted([*VARIANTS, "gate: cosine-min ≥ 0.99"])
    assert len(markers) == len(VARIANTS)
    for i, (text, box) in enumerate(labels):
        assert box.inside(plot), f"label {text!r} {box} is clipped by the plot area {plot}"
        for other_text, other in labels[i + 1:]:
            assert not box.intersects(other), f"labels {text!r} and {other_text!r} overlap: {box}, {other}"
        for _, marker in markers:
            assert not box.intersects(marker), f"label {text!r} covers a marker at {marker}"
    assert (tmp_path / "report-chart.png").stat().st_size > 0


def test_hovering_a_variant_shows_all_its_figures(report):
    page = report.page
    markers = rects(page, "#variant-chart .scatterlayer path.point")
    leftmost = min((marker for _, marker in markers), key=lambda marker: marker.left)  # int8-static, the fastest
    page.mouse.move((leftmost.left + leftmost.right) / 2, (leftmost.top + leftmost.bottom) / 2)
    tooltip = page.locator("#variant-chart .hoverlayer .hovertext")
    tooltip.first.wait_for(timeout=10_000)
    text = tooltip.first.text_content()

    for figure in ("int8-static", "rejected: cosine-min 0.9712", "p50 96.50 ms", "p95 101.33 ms",
                   "ratio vs fp32 0.650× [0.620, 0.680] · 24 rounds", "size 23.0 MB",
                   "cosine min 0.9712 · mean 0.9752", "avx2 · AMD EPYC 7B13 · avx2, fma"):
        assert figure in text, f"{figure!r} not in the tooltip {text!r}"


def test_the_chart_shows_hardware_intervals_and_the_gate_and_loads_nothing_from_a_network(report):
    page = report.page
    (_, plot), = rects(page, "#variant-chart .draglayer rect.nsewdrag")
    rules = [box for _, box in rects(page, "#variant-chart .shapelayer path")
             if box.bottom - box.top < 1 and box.right - box.left >= plot.right - plot.left - 1]
    (_, tick), = [(text, box) for text, box in rects(page, "#variant-chart .ytick text") if text == str(GATE)]

    assert "hardware: avx2" in page.locator("#variant-chart .gtitle").text_content()
    assert page.locator("#variant-chart .errorbar").count() == len(VARIANTS) - 1  # every ratio but fp32's own
    assert len(rules) == 1 and abs(rules[0].top - (tick.top + tick.bottom) / 2) < 2, (rules, tick)
    assert report.requests == [page.url], report.requests  # the file itself, nothing else
    buttons = page.eval_on_selector_all("#variant-chart .modebar-btn", "els => els.map(e => e.dataset.title)")
    assert "Download plot as a PNG" in buttons and not [b for b in buttons if "share" in b.lower()], buttons
