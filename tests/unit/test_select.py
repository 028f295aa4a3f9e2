"""The selection over gated and side-by-side timed variants: fp32 as a candidate, verdicts, messages."""

from __future__ import annotations

from shared.inference.paired import PairedPlan, measure_paired
from shared.jobspec import parse_job
from tests.unit.test_paired import Machine
from worker.stages.select import annotate, apply_accuracy_gate, choose, failure, format_rejections

JOB = """
model: {{name: digits, source: digits.keras, format: keras, eval_data: ./eval.npz}}
convert: {{to: tflite}}
optimize: {{variants: [float16, dynamic-range, int8], gate: {gate}, objective: {objective}{extra}}}
"""
HARDWARE = {"class": "cpu-avx2"}


def optimize(gate: str = "{cosine_min: 0.95, accuracy_drop_max: 0.01}", objective: str = "size", extra: str = ""):
    return parse_job(JOB.format(gate=gate, objective=objective, extra=extra)).optimize


def row(variant: str, *, size: int, accuracy: float | None = 0.92, passed: bool = True,
        reason: str = "passed the gate", float_ops: int | None = None) -> dict:
    return {"variant": variant, "step_key": variant, "size_bytes": size, "accuracy": accuracy,
            "cosine_min": 0.999, "passed": passed, "reason": reason, "float_ops": float_ops}


def timed(rows: list[dict], ms: dict[str, float], noise: float = 0.01) -> dict:
    """Time fake models of the given milliseconds side by side (those of the rows that passed) and annotate."""
    machine = Machine(noise=noise)
    runners = {r["variant"]: machine.model(r["variant"], ms[r["variant"]])
               for r in rows if r["variant"] == "fp32" or r["passed"]}
    measurement = measure_paired(runners, "fp32", PairedPlan(), clock=machine.clock)
    annotate(rows, measurement, HARDWARE)
    return measurement


def select(spec, rows, ms, **kwargs):
    apply_accuracy_gate(spec.gate, rows)
    measurement = timed(rows, ms)
    return choose(spec, rows, measurement=measurement, hardware_class="cpu-avx2", **kwargs)


def measured() -> list[dict]:
    return [row("fp32", size=160_000, accuracy=0.9200),
            row("float16", size=80_000, accuracy=0.9200),
            row("dynamic-range", size=46_000, accuracy=0.9125),
            row("int8", size=45_000, accuracy=0.8900)]


EVEN = {"fp32": 1.0, "float16": 1.0, "dynamic-range": 1.0, "int8": 1.0}


# -- the accuracy gate ------------------------------------------------------------------------------

def test_a_variant_losing_more_accuracy_than_the_gate_allows_is_rejected_with_both_accuracies():
    selection = select(optimize(), measured(), EVEN)
    verdict = {r["variant"]: r["verdict"] for r in selection.table}

    assert verdict["int8"] == ("rejected: accuracy 0.8900 is 0.0300 below fp32's 0.9200 "
                               "> gate accuracy_drop_max 0.01")


def test_the_smallest_variant_within_the_accuracy_drop_is_selected():
    selection = select(optimize(), measured(), EVEN)

    assert selection.best["variant"] == "dynamic-range" and selection.improved
    assert {r["variant"]: r.get("accuracy_drop") for r in selection.table}["dynamic-range"] == 0.9200 - 0.9125


def test_without_an_accuracy_gate_accuracy_is_reported_but_rejects_nothing():
    assert select(optimize(gate="{cosine_min: 0.95}"), measured(), EVEN).best["variant"] == "int8"


def test_an_accuracy_gate_without_a_measured_baseline_rejects_every_variant_and_the_job_fails():
    spec = optimize()
    rows = measured()[1:]
    apply_accuracy_gate(spec.gate, rows)
    selection = choose(spec, rows)

    assert selection.best is None
    assert all("the fp32 baseline has no measured accuracy" in r["verdict"] for r in selection.table)
    assert failure(spec, selection, None).startswith("no variant passed: ")


def test_a_variant_failing_both_cosine_and_accuracy_names_both_reasons():
    rows = measured()
    rows[3] = row("int8", size=45_000, accuracy=0.89, passed=False, reason="cosine_min 0.9000 < gate 0.95")
    verdict = {r["variant"]: r["verdict"] for r in select(optimize(), rows, EVEN).table}["int8"]

    assert "cosine_min 0.9000 < gate 0.95" in verdict and "accuracy 0.8900" in verdict


# -- objective latency: only a measurably faster variant beats fp32 ---------------------------------

def test_a_measurably_faster_variant_is_selected_with_its_ratio_interval_and_hardware():
    rows = [row("fp32", size=160_000), row("int8", size=45_000), row("float16", size=80_000)]
    selection = select(optimize(objective="latency"), rows, {"fp32": 60.0, "int8": 42.0, "float16": 60.3})

    best = selection.best
    assert best["variant"] == "int8" and best["verdict"] == "selected" and selection.message is None
    assert best["speed"] == "faster" and best["ratio_low"] < 0.7 < best["ratio_high"] < 0.75
    assert best["hardware_class"] == "cpu-avx2" and best["rounds"] >= 5 and best["p50_ms"] > 0
    verdicts = {r["variant"]: r["verdict"] for r in selection.table}
    assert verdicts["float16"].startswith("not selected: no measurable difference from fp32 (ratio 1.0")
    assert verdicts["fp32"] == "baseline"


def test_when_every_variant_is_slower_or_not_measurably_faster_fp32_is_deployed_and_the_job_says_so():
    rows = [row("fp32", size=160_000), row("float16", size=80_000), row("int8", size=45_000)]
    spec = optimize(objective="latency")
    selection = select(spec, rows, {"fp32": 1.0, "float16": 1.2, "int8": 1.005})

    assert selection.best["variant"] == "fp32" and selection.best["verdict"] == "selected"
    assert not selection.improved
    assert selection.message == "no variant was faster than fp32 on cpu-avx2; deployed fp32"
    assert failure(spec, selection, "cpu-avx2") is None
    verdict = {r["variant"]: r["verdict"] for r in selection.table}
    assert verdict["float16"].startswith("rejected: slower than fp32 (ratio 1.20 (99.2% CI 1.")
    assert verdict["int8"].startswith("not selected: no measurable difference from fp32")


def test_require_improvement_turns_deploying_fp32_into_the_old_failure_naming_the_slower_variants():
    rows = [row("fp32", size=160_000), row("float16", size=80_000)]
    spec = optimize(objective="latency", extra=", require_improvement: true")
    selection = select(spec, rows, {"fp32": 1.0, "float16": 1.2})

    message = failure(spec, selection, "cpu-avx2")
    assert message.startswith("no variant was faster than fp32 on cpu-avx2: float16 (rejected: slower than fp32")
    assert "Passed the fidelity gate but are slower than fp32" in message and "optimize.objective: size" in message
    assert message.endswith("(optimize.require_improvement: true)")


def test_when_nothing_passes_the_gate_fp32_is_deployed_and_only_fp32_is_timed():
    rows = [row("fp32", size=160_000), row("int8", size=45_000, passed=False, reason="cosine_min 0.9 < gate 0.99")]
    spec = optimize(gate="{cosine_min: 0.99}", objective="latency")
    selection = select(spec, rows, {"fp32": 1.0, "int8": 0.5}, deploying=False)

    assert selection.best["variant"] == "fp32"
    assert selection.message == "no variant passed the gate; selected fp32"
    assert "ratio" not in {r["variant"]: r for r in selection.table}["int8"]
    strict = optimize(gate="{cosine_min: 0.99}", objective="latency", extra=", require_improvement: true")
    assert failure(strict, selection, "cpu-avx2").startswith("no variant passed: int8 (rejected: cosine_min 0.9")
    assert "objective" not in format_rejections(selection.table)


def test_of_two_faster_variants_not_measurably_different_from_each_other_the_smaller_wins():
    rows = [row("fp32", size=160_000), row("graph+int8", size=46_000), row("int8", size=45_000)]
    selection = select(optimize(objective="latency"), rows, {"fp32": 60.0, "graph+int8": 41.5, "int8": 42.0})

    assert selection.best["variant"] == "int8"
    assert {r["variant"]: r["verdict"] for r in selection.table}["graph+int8"] == "candidate"


def test_of_two_faster_variants_the_measurably_faster_wins_even_if_larger():
    rows = [row("fp32", size=160_000), row("int8", size=45_000), row("fp16", size=80_000)]
    selection = select(optimize(objective="latency"), rows, {"fp32": 60.0, "int8": 42.0, "fp16": 30.0})

    assert selection.best["variant"] == "fp16"


def test_at_equal_speed_and_size_fewer_float_operators_win():
    rows = [row("fp32", size=160_000), row("a", size=45_000, float_ops=12), row("b", size=45_000, float_ops=3)]
    selection = select(optimize(objective="latency"), rows, {"fp32": 60.0, "a": 42.0, "b": 42.0})

    assert selection.best["variant"] == "b"


# -- objective size ----------------------------------------------------------------------------

def test_objective_size_deploys_the_smallest_gate_passer_even_when_slower():
    rows = [row("fp32", size=160_000), row("int8", size=45_000), row("float16", size=80_000)]
    selection = select(optimize(gate="{cosine_min: 0.95}"), rows, {"fp32": 1.0, "int8": 1.5, "float16": 1.0})

    assert selection.best["variant"] == "int8" and selection.best["speed"] == "slower"


def test_fp32_that_fails_its_own_gate_is_no_candidate_and_the_job_fails():
    rows = [row("fp32", size=160_000, passed=False, reason="cosine_min 0.9 < gate 0.95"),
            row("int8", size=45_000, passed=False, reason="cosine_min 0.8 < gate 0.95")]
    spec = optimize(gate="{cosine_min: 0.95}")
    selection = choose(spec, rows)

    assert selection.best is None
    assert failure(spec, selection, None) == "no variant passed: int8 (rejected: cosine_min 0.8 < gate 0.95)"
