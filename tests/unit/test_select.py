"""The selection over measured variants: the accuracy gate against fp32, and failure messages."""

from __future__ import annotations

from types import SimpleNamespace

from shared.jobspec import parse_job
from worker.stages.optimize import format_rejections, select

JOB = """
model: {{name: digits, source: digits.keras, format: keras, eval_data: ./eval.npz}}
convert: {{to: tflite}}
optimize: {{variants: [float16, dynamic-range, int8], gate: {gate}, objective: {objective}}}
"""


def stage(gate: str = "{cosine_min: 0.95, accuracy_drop_max: 0.01}", objective: str = "size") -> SimpleNamespace:
    """What select reads of a stage: the job spec."""
    return SimpleNamespace(spec=parse_job(JOB.format(gate=gate, objective=objective)))


def row(variant: str, *, size: int, p50: float, accuracy: float | None, passed: bool = True,
        reason: str = "passed the gate") -> dict:
    return {"variant": variant, "step_key": variant, "size_bytes": size, "p50_ms": p50, "accuracy": accuracy,
            "cosine_min": 0.999, "passed": passed, "reason": reason}


def measured() -> list[dict]:
    return [row("fp32", size=160_000, p50=1.0, accuracy=0.9200),
            row("float16", size=80_000, p50=1.0, accuracy=0.9200),
            row("dynamic-range", size=46_000, p50=1.0, accuracy=0.9125),
            row("int8", size=45_000, p50=1.0, accuracy=0.8900)]


def test_a_variant_losing_more_accuracy_than_the_gate_allows_is_rejected_with_both_accuracies():
    _, table = select(stage(), measured())
    verdict = {r["variant"]: r["verdict"] for r in table}

    assert verdict["int8"] == ("rejected: accuracy 0.8900 is 0.0300 below fp32's 0.9200 "
                               "> gate accuracy_drop_max 0.01")


def test_the_smallest_variant_within_the_accuracy_drop_is_selected():
    best, table = select(stage(), measured())

    assert best["variant"] == "dynamic-range"
    assert {r["variant"]: r["accuracy_drop"] for r in table if r["variant"] != "fp32"}["dynamic-range"] == \
        0.9200 - 0.9125


def test_without_an_accuracy_gate_accuracy_is_reported_but_rejects_nothing():
    best, _ = select(stage(gate="{cosine_min: 0.95}"), measured())

    assert best["variant"] == "int8"


def test_an_accuracy_gate_without_a_measured_baseline_rejects_every_variant():
    best, table = select(stage(), measured()[1:])

    assert best is None
    assert all("the fp32 baseline has no measured accuracy" in r["verdict"] for r in table)


def test_a_variant_failing_both_cosine_and_accuracy_names_both_reasons():
    rows = measured()
    rows[3] = row("int8", size=45_000, p50=1.0, accuracy=0.89, passed=False, reason="cosine_min 0.9000 < gate 0.95")
    _, table = select(stage(), rows)

    verdict = {r["variant"]: r["verdict"] for r in table}["int8"]
    assert "cosine_min 0.9000 < gate 0.95" in verdict and "accuracy 0.8900" in verdict


def test_when_gate_passers_are_all_slower_than_fp32_the_failure_names_them_and_suggests_objective_size():
    rows = [row("fp32", size=160_000, p50=1.0, accuracy=0.92), row("float16", size=80_000, p50=1.2, accuracy=0.92),
            row("int8", size=45_000, p50=1.5, accuracy=0.80)]
    best, table = select(stage(objective="latency"), rows)

    message = format_rejections(table)
    assert best is None
    assert "float16 (rejected: slower than fp32 (1.2 ms vs 1.0 ms))" in message
    assert "Passed the fidelity gate but are slower than fp32" in message and ": float16;" in message
    assert "optimize.objective: size" in message


def test_a_failure_where_nothing_passed_the_gate_does_not_suggest_objective_size():
    rows = [row("fp32", size=160_000, p50=1.0, accuracy=0.92), row("int8", size=45_000, p50=0.5, accuracy=0.80)]
    _, table = select(stage(objective="latency"), rows)

    assert "objective" not in format_rejections(table)
