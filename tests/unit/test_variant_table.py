"""The variant table of `modelyard status` / `report`: paired ratio, interval, rounds, verdict, hardware."""

from __future__ import annotations

from rich.console import Console

from producer.render import ratio_cell, summary_lines, variants_table
from producer.report import html_report

FP32 = {"variant": "fp32", "size_bytes": 90_400_000, "p50_ms": 150.2, "p95_ms": 160.0, "rounds": 7,
        "cosine_min": 1.0, "cosine_mean": 1.0, "calibration_cosine_min": 1.0, "hardware_class": "cpu-avx2",
        "verdict": "baseline"}
INT8 = {"variant": "int8-dynamic", "size_bytes": 23_100_000, "size_ratio": 0.256, "p50_ms": 105.1, "p95_ms": 112.0,
        "ratio": 0.7012, "ratio_low": 0.688, "ratio_high": 0.717, "rounds": 7, "speed": "faster",
        "cosine_min": 0.9912, "cosine_mean": 0.9951, "calibration_cosine_min": 0.9934, "hardware_class": "cpu-avx2",
        "verdict": "selected"}


def job(rows: list[dict], result: dict) -> dict:
    return {"id": "j1", "model": "minilm", "state": "SUCCEEDED", "spec": {}, "result": result,
            "stages": {"select": {"table": rows, "hardware": {"class": "cpu-avx2"}}}}


def text(renderable) -> str:
    console = Console(width=250, record=True)
    console.print(renderable)
    return console.export_text()


def test_the_table_shows_each_variants_ratio_interval_rounds_hardware_and_both_fidelities():
    shown = text(variants_table(job([FP32, INT8], {"variant": "int8-dynamic"})))

    assert "timed side by side on cpu-avx2" in shown
    assert "0.70x (0.69-0.72)" in shown and "1x" in shown
    assert "0.9912 | 0.9934" in shown and "cpu-avx2" in shown and "selected" in shown


def test_a_ratio_without_an_interval_shows_the_ratio_alone_and_an_untimed_row_a_dash():
    assert ratio_cell({"variant": "v", "ratio": 0.9, "ratio_low": None}) == "0.90x"
    assert ratio_cell({"variant": "v"}) == "-"


def test_the_summary_says_why_fp32_was_deployed():
    message = "no variant was faster than fp32 on cpu-avx2; deployed fp32"
    lines = summary_lines(job([{**FP32, "verdict": "selected"}], {"variant": "fp32", "message": message}))

    assert message in lines


def test_the_summary_of_a_deployed_variant_gives_its_paired_ratio_and_hardware():
    line = summary_lines(job([FP32, INT8], {"variant": "int8-dynamic"}))[-1]

    assert "0.70x FP32 150.2 ms side by side, interval 0.69-0.72, 7 rounds on cpu-avx2" in line


def test_the_html_table_has_the_paired_columns():
    page = html_report(job([FP32, INT8], {"variant": "int8-dynamic"}))

    assert "vs fp32 (interval)" in page and "0.70x (0.69-0.72)" in page and "cosine min (calibration)" in page


def test_the_summary_says_what_the_int8_optimizer_kept_float_and_what_each_float_matmul_bought():
    quantization = {"weight_type": "int8", "reduce_range": "True", "weight_symmetric": "True",
                    "float_nodes": "encoder/layer.0/output/dense", "float_channels": "5",
                    "saturation": "detected: 8-bit weights cosine-min -0.0500, 7-bit 0.9940 on the fit rows",
                    "float_node_costs": [{"node": "encoder/layer.0/output/dense", "check_cosine_min_gain": 0.0031,
                                          "predicted_latency_ratio": 0.74}]}
    line = summary_lines(job([FP32, {**INT8, "quantization": quantization}], {"variant": "int8-dynamic"}))[-1]

    assert line.startswith("int8-dynamic: int8 7-bit symmetric weights; float MatMuls: encoder/layer.0/output/dense "
                           "(+0.0031 cosine-min, predicted 0.74x fp32 with it); 5 outlier activation channels in float")
    assert "saturation detected: 8-bit weights cosine-min -0.0500" in line
    assert summary_lines(job([FP32, INT8], {"variant": "int8-dynamic"}))[-1].startswith("int8-dynamic: 23.1 MB")
    page = html_report(job([FP32, {**INT8, "quantization": quantization}], {"variant": "int8-dynamic"}))
    assert "5 outlier activation channels in float" in page
