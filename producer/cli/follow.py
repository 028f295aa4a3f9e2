"""Following a job to its end: a live table on a terminal, one line per change anywhere else.

``submit --wait``, ``wait`` and ``run`` show progress the same way and end with the same report
(the stage table, the variant table, the summary; or the record as JSON with ``--json``, the
progress lines then going to stderr).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import typer
from rich.live import Live

from producer import api
from producer.cli.app import EXIT_INTERRUPTED, EXIT_JOB_FAILED, EXIT_TIMEOUT, console, err, fail, guard
from producer.progress import ProgressLines
from producer.render import stages_table, summary_lines, variants_table
from shared.jobs import SUCCEEDED

ShowJob = Callable[[dict], None]


@contextmanager
def job_view(*, as_json: bool) -> Iterator[ShowJob]:
    """A function to call with each new job record while the block runs."""
    if console.is_terminal and not as_json:
        with Live(console=console, refresh_per_second=4, transient=True) as live:
            yield lambda job: live.update(stages_table(job))
        return
    out = err if as_json else console  # with --json, stdout is for the JSON alone
    progress = ProgressLines()

    def show(job: dict) -> None:
        for line in progress.changes(job):
            out.print(line, highlight=False, markup=False, soft_wrap=True)

    yield show


def print_job(job: dict) -> None:
    console.print(stages_table(job))
    variants = variants_table(job)
    if variants is not None:
        console.print(variants)
    for line in summary_lines(job):
        console.print(line, highlight=False)


def report_outcome(job: dict, *, as_json: bool) -> None:
    """Print the ended job; exit 1 unless it SUCCEEDED."""
    if as_json:
        console.print_json(json.dumps(job, default=str))
    else:
        print_job(job)
    if job["state"] != SUCCEEDED:
        raise typer.Exit(EXIT_JOB_FAILED)


def follow(job_id: str, *, as_json: bool, timeout: float) -> None:
    """Wait for a submitted job, showing its progress, then report it."""

    def waiting() -> dict:
        with job_view(as_json=as_json) as show:
            return api.wait(job_id, timeout=timeout, on_update=show)

    try:
        job = guard(waiting)
    except api.WaitTimeout as exc:
        raise fail(f"{exc} (--timeout {timeout:g}); it goes on running: 'modelyard wait {job_id}' follows it "
                   f"again, 'modelyard cancel {job_id}' stops it", EXIT_TIMEOUT) from None
    except KeyboardInterrupt:
        raise fail(f"stopped following job {job_id}; it goes on running ('modelyard status {job_id}')",
                   EXIT_INTERRUPTED) from None
    report_outcome(job, as_json=as_json)
