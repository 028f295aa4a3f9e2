"""Operator commands: queues, workers, jobs.

Registered on the ``modelyard`` app when ``producer.cli`` imports this module. The data comes from
``producer.operations`` (plain functions); this module only connects, calls and renders.
Exit codes as elsewhere: 2 bad input (or no broker configured), 3 Redis unreachable.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from producer import api, operations
from producer.cli.app import app, console, guard

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
TimeoutOption = Annotated[float, typer.Option("--timeout", min=0.1,
                                              help="Seconds to wait for workers to answer.")]


def _broker():
    """(celery app, redis client) for the configured broker, after checking that Redis answers."""
    jobs = api.connect()  # UserInputError without a broker, BrokerUnavailable when it does not answer
    return api._celery(api.broker_url()), jobs


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _print_json(key: str, rows: Any) -> None:
    console.print_json(json.dumps({key: rows}, default=str))


@app.command()
def queues(as_json: JsonOption = False, timeout: TimeoutOption = 1.0) -> None:
    """Per queue: messages waiting, reserved (running) messages, and online consumers."""

    def gather():
        celery_app, jobs = _broker()
        active_queues = celery_app.control.inspect(timeout=timeout).active_queues() or {}
        return operations.queue_report(jobs.redis, active_queues=active_queues,
                                       transport_options=dict(celery_app.conf.broker_transport_options or {}))

    rows = guard(gather)
    if as_json:
        _print_json("queues", rows)
        return
    table = Table(title="queues", title_justify="left")
    table.add_column("queue", style="bold")
    table.add_column("waiting", justify="right")
    table.add_column("unacked", justify="right")
    table.add_column("consumers", justify="right")
    table.add_column("workers")
    for row in rows:
        table.add_row(row["queue"], str(row["depth"]), str(row["unacked"]), str(row["consumers"]),
                      ", ".join(row["workers"]) or "-")
    console.print(table)


@app.command()
def workers(as_json: JsonOption = False, timeout: TimeoutOption = 1.0) -> None:
    """Online workers: queues, hardware class (what optimize.target names), pool, the stage each is running."""

    def gather():
        celery_app, _jobs = _broker()
        return operations.workers_report(celery_app, timeout=timeout)

    rows = guard(gather)
    if as_json:
        _print_json("workers", rows)
        return
    table = Table(title=f"workers online: {len(rows)}", title_justify="left")
    table.add_column("worker", style="bold")
    table.add_column("queues")
    table.add_column("class")
    table.add_column("pool")
    table.add_column("running")
    table.add_column("since")
    table.add_column("processed", justify="right")
    now = time.time()
    for row in rows:
        pool = f"{row['pool'] or '?'} x{row['concurrency']}" if row["concurrency"] else (row["pool"] or "?")
        running = [
            f"{t['job_id'] or '?'} {t['stage']}" + (f":{t['variant']}" if t["variant"] else "")
            for t in row["active"]
        ]
        since = [_duration(now - t["started"]) if t["started"] else "-" for t in row["active"]]
        table.add_row(escape(row["name"]), ", ".join(row["queues"]) or "-", row.get("hardware_class") or "-", pool,
                      escape("\n".join(running)) or "idle",
                      "\n".join(since) or "-", str(row["processed"]))
    console.print(table)


@app.command()
def jobs(
    state: Annotated[str | None, typer.Option("--state", help="Only jobs in this state: "
                                              + ", ".join(operations.STATES) + ".")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Only jobs of this model name.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="At most this many jobs.")] = 20,
    as_json: JsonOption = False,
) -> None:
    """Recent jobs, newest first: state, model, created, duration, error."""

    def gather():
        operations.normalize_state(state)  # a bad --state is exit 2 before contacting Redis
        return operations.jobs_report(api.connect(), state=state, model=model, limit=limit)

    rows = guard(gather)
    if as_json:
        _print_json("jobs", rows)
        return
    table = Table(title=f"jobs ({len(rows)})", title_justify="left")
    table.add_column("job", style="bold", no_wrap=True)
    table.add_column("state")
    table.add_column("model")
    table.add_column("created", no_wrap=True)
    table.add_column("duration", justify="right")
    table.add_column("error")
    colours = {"SUCCEEDED": "green", "FAILED": "red", "CANCELLED": "yellow", "RUNNING": "cyan"}
    for row in rows:
        colour = colours.get(row["state"])
        table.add_row(escape(row["id"]), f"[{colour}]{row['state']}[/]" if colour else escape(row["state"]),
                      escape(str(row["model"] or "-")), _when(row["created"]), _duration(row["duration_s"]),
                      escape(row["error_summary"] or ""))
    console.print(table)
