"""The selection: which variant to deploy, from the gate verdicts and the paired timing. Plain functions.

fp32 is a candidate like any variant that passed the gate. With ``objective: latency`` a variant
wins only when its paired ratio to fp32 is *measurably* below 1 (``shared.inference.paired``);
of several such variants the fastest wins, and those not measurably different from it are
decided by the tie-break: smaller, then fewer float operators. When nothing is measurably
faster, fp32 is deployed and the job says so. With ``objective: size`` the smallest candidate
wins (ties: faster, then fewer float operators). ``optimize.require_improvement: true`` turns
"fp32 is the best there is" into the job's failure (``failure``), as before fp32 was a candidate.

The timing itself, and the download of every candidate, is ``worker.stages.select_measure``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shared.inference.paired import FASTER, NO_DIFFERENCE, SLOWER, pairwise, verdict
from shared.jobspec import BASELINE, Gate, OptimizeSpec

REJECTED_SLOWER = "rejected: slower than fp32"  # passed the gate, but measurably slower (objective: latency)


@dataclass
class Selection:
    best: dict | None  # the row to deploy; None when not even fp32 qualifies
    table: list[dict]
    message: str | None = None  # why fp32 was deployed, when it was
    improved: bool = False  # a variant other than fp32 was chosen


def apply_accuracy_gate(gate: Gate, rows: list[dict]) -> None:
    """The accuracy gate, which needs fp32's accuracy (known only once every variant is built): rows in place."""
    baseline = next((r for r in rows if r["variant"] == BASELINE), None)
    for row in rows:
        if row["variant"] == BASELINE:
            continue
        if baseline and row.get("accuracy") is not None and baseline.get("accuracy") is not None:
            row["accuracy_drop"] = baseline["accuracy"] - row["accuracy"]
        why = accuracy_verdict(gate, row, baseline)
        if why:
            row["reason"] = f"{row['reason']}; {why}" if not row["passed"] else why
            row["passed"] = False


def accuracy_verdict(gate: Gate, row: dict, baseline: dict | None) -> str | None:
    """Why a variant fails the gate's ``accuracy_drop_max`` against fp32; None when it does not."""
    if gate.accuracy_drop_max is None:
        return None
    if baseline is None or baseline.get("accuracy") is None:
        return "accuracy drop unknown: the fp32 baseline has no measured accuracy"
    if row.get("accuracy") is None:
        return "accuracy not measured"
    drop = baseline["accuracy"] - row["accuracy"]
    if drop > gate.accuracy_drop_max + 1e-9:  # accuracies are fractions of rows: allow rounding
        return (f"accuracy {row['accuracy']:.4f} is {drop:.4f} below fp32's {baseline['accuracy']:.4f} "
                f"> gate accuracy_drop_max {gate.accuracy_drop_max}")
    return None


def annotate(rows: list[dict], measurement: dict | None, hardware: dict | None) -> None:
    """Put the paired figures of each timed row into it: p50/p95, ratio to fp32 with its interval, verdict."""
    if not measurement:
        return
    hardware_class = (hardware or {}).get("class")
    for row in rows:
        figures = measurement["models"].get(row["variant"])
        if figures is None:
            continue
        row.update(p50_ms=figures["p50_ms"], p95_ms=figures["p95_ms"], hardware_class=hardware_class,
                   rounds=measurement["rounds"])
        ratio = measurement["ratios"].get(row["variant"])
        if ratio:
            row.update(ratio=ratio["ratio"], ratio_low=ratio["low"], ratio_high=ratio["high"], speed=ratio["verdict"],
                       speedup=1 / ratio["ratio"] if ratio["ratio"] else None)


def describe_ratio(row: dict, confidence: float = 0.95) -> str:
    """``ratio 0.71 (99.2% CI 0.69-0.73, 8 rounds)``: a row's paired ratio to fp32 and the interval that decided."""
    if row.get("ratio_low") is None:
        return f"ratio {row['ratio']:.2f} ({row.get('rounds', 0)} round)"
    return (f"ratio {row['ratio']:.2f} ({confidence:.1%} CI {row['ratio_low']:.2f}-{row['ratio_high']:.2f}, "
            f"{row['rounds']} rounds)")


def choose(optimize: OptimizeSpec, rows: list[dict], *, measurement: dict | None = None,
           hardware_class: str | None = None, deploying: bool = True) -> Selection:
    """The variant to deploy and the table with every verdict (rows annotated by ``annotate``)."""
    table = [dict(row) for row in rows]
    baseline = next((r for r in table if r["variant"] == BASELINE), None)
    confidence = (measurement or {}).get("plan", {}).get("interval_confidence", 0.95)
    for row in table:
        if row["variant"] != BASELINE and baseline:
            row["size_ratio"] = row["size_bytes"] / baseline["size_bytes"] if baseline["size_bytes"] else None
    passers = [r for r in table if r["variant"] != BASELINE and r["passed"] and not r.get("timing_error")]
    latency = optimize.objective == "latency"
    for row in table:
        if row["variant"] == BASELINE:
            row["verdict"] = "baseline"
        elif not row["passed"]:
            row["verdict"] = f"rejected: {row['reason']}"
        elif row.get("timing_error"):
            row["verdict"] = f"error: {row['timing_error']}"
        elif latency and row.get("speed") == SLOWER:
            row["verdict"] = f"{REJECTED_SLOWER} ({describe_ratio(row, confidence)})"
        elif latency and row.get("speed") != FASTER:
            row["verdict"] = f"not selected: {NO_DIFFERENCE} from fp32 ({describe_ratio(row, confidence)})" \
                if row.get("ratio") is not None else "not selected: not timed"
        else:
            row["verdict"] = "candidate"
    fp32_ok = baseline is not None and baseline.get("passed", True)
    if latency:
        best = _fastest([r for r in passers if r.get("speed") == FASTER], measurement, optimize)
    else:
        pool = passers + ([baseline] if fp32_ok else [])
        best = min(pool, key=lambda r: (r["size_bytes"], _ops(r), _ratio(r))) if pool else None
    if best is not None and best is not baseline:
        best["verdict"] = "selected"
        return Selection(best, table, improved=True)
    if not fp32_ok:
        return Selection(None, table)
    baseline["verdict"] = "selected"
    done = "deployed" if deploying else "selected"
    if not passers:
        message = f"no variant passed the gate; {done} fp32"
    elif latency:
        message = f"no variant was faster than fp32 on {hardware_class or 'this hardware'}; {done} fp32"
    else:
        message = f"no variant was smaller than fp32; {done} fp32"
    return Selection(baseline, table, message=message)


def _fastest(faster: list[dict], measurement: dict | None, optimize: OptimizeSpec) -> dict | None:
    """The fastest row; rows not measurably different from it are decided by size, then float operators."""
    if not faster:
        return None
    fastest = min(faster, key=_ratio)
    margin = (measurement or {}).get("plan", {}).get("margin", 0.03)
    tied = [fastest]
    for row in faster:
        if row is not fastest and measurement:
            if verdict(pairwise(measurement, row["variant"], fastest["variant"]), margin) == NO_DIFFERENCE:
                tied.append(row)
    return min(tied, key=lambda r: (r["size_bytes"], _ops(r), _ratio(r)))


def _ops(row: dict) -> float:
    return row["float_ops"] if row.get("float_ops") is not None else math.inf


def _ratio(row: dict) -> float:
    return row["ratio"] if row.get("ratio") is not None else math.inf


def failure(optimize: OptimizeSpec, selection: Selection, hardware_class: str | None) -> str | None:
    """Why the job fails: nothing qualifies, or fp32 won and the job asked for an improvement."""
    if selection.best is None:
        return "no variant passed: " + format_rejections(selection.table)
    if selection.improved or not optimize.require_improvement:
        return None
    passed = any(r["passed"] for r in selection.table if r["variant"] != BASELINE)
    if not passed:
        return "no variant passed: " + format_rejections(selection.table) + " (optimize.require_improvement: true)"
    what = (f"faster than fp32 on {hardware_class or 'this hardware'}" if optimize.objective == "latency"
            else "smaller than fp32")
    return f"no variant was {what}: {format_rejections(selection.table)} (optimize.require_improvement: true)"


def format_rejections(table: list[dict]) -> str:
    """What was tried and why each lost; names the variants that passed the gate but are slower than fp32."""
    rows = [f"{r['variant']} ({r['verdict']})" for r in table if r["variant"] != BASELINE]
    message = "; ".join(rows)
    slower = [r["variant"] for r in table if r.get("passed") and r.get("verdict", "").startswith(REJECTED_SLOWER)]
    if slower:
        message += (f". Passed the fidelity gate but are slower than fp32, so objective: latency keeps none of them: "
                    f"{', '.join(slower)}; set optimize.objective: size to deploy the smallest of them")
    return message
