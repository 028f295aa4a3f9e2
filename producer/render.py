"""Human views of a job for the terminal (rich)."""

from __future__ import annotations

import time

from rich.table import Table

from shared.jobs import STAGE_RUNNING

STATE_STYLE = {"QUEUED": "yellow", "RUNNING": "cyan", "SUCCEEDED": "green", "FAILED": "red", "CANCELLED": "magenta"}


def human_bytes(size: float | None) -> str:
    if size is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{size:.1f} GB"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def stage_rows(job: dict) -> list[tuple[str, dict]]:
    planned = job.get("queues", {})
    stages = job.get("stages", {})
    names = list(planned) + [name for name in stages if name not in planned]
    return [(name, {"queue": planned.get(name), **stages.get(name, {})}) for name in names]


def stages_table(job: dict) -> Table:
    state = job["state"]
    title = f"job {job['id']} · {job.get('model', '')} · [{STATE_STYLE.get(state, '')}]{state}[/]"
    table = Table(title=title, title_justify="left")
    for column in ("stage", "state", "pool", "worker", "time", "size", "p50 ms", "cosine min"):
        table.add_column(column)
    now = time.time()
    for name, stage in stage_rows(job):
        st = stage.get("state", "waiting")
        progress = stage.get("progress")
        if st == STAGE_RUNNING and progress and progress.get("steps"):  # a training stage (compress)
            st = (f"running: epoch {progress['epoch']}/{progress['epochs']} step {progress['step']}/"
                  f"{progress['steps']} loss {progress.get('loss', 0):.4f}")
        if st == "waiting" and stage.get("queue") == "gpu" and state in ("QUEUED", "RUNNING"):
            st = "waiting for the gpu pool"
        started, finished = stage.get("started"), stage.get("finished")
        elapsed = (finished or now) - started if started else None
        metrics = stage.get("metrics", {})
        latency = metrics.get("latency", {})
        fidelity = metrics.get("fidelity", {})
        table.add_row(
            name, st, stage.get("queue") or "-", stage.get("worker", "-"),
            _fmt(elapsed, ".1f") + ("s" if elapsed else ""), human_bytes(stage.get("size_bytes")),
            _fmt(latency.get("p50_ms"), ".1f"), _fmt(fidelity.get("cosine_min"), ".4f"),
        )
    return table


def variants_table(job: dict) -> Table | None:
    rows = job.get("stages", {}).get("select", {}).get("table")
    if not rows:
        return None
    select = job.get("stages", {}).get("select", {})
    hardware = (select.get("hardware") or {}).get("class")
    title = "variants" + (f" · timed side by side on {hardware}" if hardware else "")
    table = Table(title=title, title_justify="left")
    accuracy = any(row.get("accuracy") is not None for row in rows)  # only jobs with model.eval_data have it
    columns = ["variant", "size", "size ratio", "p50 ms", "p95 ms", "vs fp32 (interval)", "rounds",
               "cosine min (gate | calib.)"]
    for column in columns + (["accuracy"] if accuracy else []) + ["hardware", "verdict"]:
        table.add_column(column)
    for row in rows:
        cells = [
            row["variant"], human_bytes(row.get("size_bytes")), _fmt(row.get("size_ratio"), ".2f"),
            _fmt(row.get("p50_ms"), ".1f"), _fmt(row.get("p95_ms"), ".1f"), ratio_cell(row),
            _fmt(row.get("rounds"), "d"), fidelity_cell(row),
        ]
        if accuracy:
            cells.append(accuracy_cell(row))
        table.add_row(*cells, row.get("hardware_class") or "-", row.get("verdict", "-"))
    return table


def ratio_cell(row: dict) -> str:
    """The paired latency ratio to fp32 and its interval: ``0.71x (0.69-0.73)``; fp32 itself is ``1x``."""
    if row.get("variant") == "fp32" and row.get("p50_ms") is not None:
        return "1x"
    if row.get("ratio") is None:
        return "-"
    if row.get("ratio_low") is None:
        return f"{row['ratio']:.2f}x"
    return f"{row['ratio']:.2f}x ({row['ratio_low']:.2f}-{row['ratio_high']:.2f})"


def fidelity_cell(row: dict) -> str:
    """Cosine min on the gate's held-out rows, then on the calibration rows the optimizers saw."""
    gate = _fmt(row.get("cosine_min"), ".4f")
    calibration = row.get("calibration_cosine_min")
    return gate if calibration is None else f"{gate} | {calibration:.4f}"


def accuracy_cell(row: dict) -> str:
    """Top-1 accuracy on the eval data, with its change against fp32: ``0.9219 (-0.0050)``."""
    if row.get("accuracy") is None:
        return "-"
    drop = row.get("accuracy_drop")
    return f"{row['accuracy']:.4f}" + (f" ({0.0 - drop:+.4f})" if drop is not None else "")  # never "-0.0000"


def summary_lines(job: dict) -> list[str]:
    lines = []
    if job["state"] == "FAILED":
        lines.append(f"[red]FAILED[/]: {job.get('error', '')}")
    deploy = job.get("stages", {}).get("deploy", {})
    rows = {r["variant"]: r for r in job.get("stages", {}).get("select", {}).get("table", [])}
    chosen = job.get("result", {}).get("variant")
    if deploy.get("version"):
        lines.append(f"deployed {deploy['model']} version {deploy['version']} as '{deploy['alias']}': {deploy['uri']}")
    message = job.get("result", {}).get("message")
    if message:
        lines.append(message)
    if chosen and chosen != "fp32" and chosen in rows and "fp32" in rows:
        row, base = rows[chosen], rows["fp32"]
        speed = ""
        if row.get("p50_ms") is not None and row.get("ratio") is not None:
            interval = (f", interval {row['ratio_low']:.2f}-{row['ratio_high']:.2f}"
                        if row.get("ratio_low") is not None else "")
            speed = (f", p50 {row['p50_ms']:.1f} ms ({row['ratio']:.2f}x FP32 {_fmt(base.get('p50_ms'), '.1f')} ms "
                     f"side by side{interval}, {row.get('rounds')} rounds on {row.get('hardware_class') or '?'})")
        lines.append(
            f"{chosen}: {human_bytes(row['size_bytes'])} ({row['size_bytes'] / base['size_bytes']:.2f}x FP32 "
            f"{human_bytes(base['size_bytes'])}){speed}, cosine vs source min {row['cosine_min']:.4f} "
            f"mean {row['cosine_mean']:.4f} on held-out rows"
        )
    if chosen in rows and rows[chosen].get("quantization"):
        lines.append(f"{chosen}: {quantization_line(rows[chosen]['quantization'])}")
    return lines


def quantization_line(summary: dict) -> str:
    """What the INT8 optimizer decided (``worker.support.quant_tuning.quantization_summary``), in a line."""
    recipe = summary.get("weight_type", "?") + (" 7-bit" if summary.get("reduce_range") == "True" else "")
    symmetric = "symmetric" if summary.get("weight_symmetric") == "True" else "asymmetric"
    costs = {cost.get("node"): cost for cost in summary.get("float_node_costs") or []}
    floats = summary.get("float_nodes") or "none"
    if floats != "none" and costs:
        floats = ", ".join(_float_node(name, costs.get(name)) for name in floats.split(", "))
    parts = [f"{recipe} {symmetric} weights", f"float MatMuls: {floats}"]
    if summary.get("float_channels") not in (None, "0"):
        parts.append(f"{summary['float_channels']} outlier activation channels in float")
    if summary.get("saturation"):
        parts.append(f"saturation {summary['saturation']}")
    return "; ".join(parts)


def _float_node(name: str, cost: dict | None) -> str:
    if not cost:
        return name
    return (f"{name} (+{cost['check_cosine_min_gain']:.4f} cosine-min, "
            f"predicted {cost['predicted_latency_ratio']:.2f}x fp32 with it)")
