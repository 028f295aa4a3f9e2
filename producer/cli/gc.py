"""``modelyard gc``: retention and garbage collection of the artifact store.

Registered on the ``modelyard`` app when ``producer.cli`` imports this module. What is kept and
why is ``shared.gc``'s; this module reads the options, connects, calls ``shared.gc.collect`` and
prints the report. Exit codes as elsewhere: 2 bad input, 3 Redis or the storage unreachable.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from producer import api
from producer.cli.app import EXIT_UNAVAILABLE, app, console, fail, guard
from producer.render import human_bytes
from shared import gc
from shared.errors import ModelyardError, UserInputError


@app.command("gc")
def gc_command(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report what would be deleted; change nothing.")] = False,
    older_than: Annotated[str | None, typer.Option(
        "--older-than", help="Keep the artifacts of jobs younger than this (30d, 12h, 90m). Default: "
        "MODELYARD_JOB_RETENTION_DAYS.", show_default=False)] = None,
    grace: Annotated[str | None, typer.Option(
        "--grace", help="Never delete an object written or reused less than this ago. Default: MODELYARD_GC_GRACE_S.",
        show_default=False)] = None,
    repository: Annotated[list[str] | None, typer.Option(
        "--repository", "-r", help="Also keep the lineage of this model repository's versions (repeatable); the "
        "repositories jobs deployed to are always included.", show_default=False)] = None,
    pin: Annotated[list[str] | None, typer.Option(
        "--pin", help="Pin a step (its key, or a unique prefix of 8+ hex digits) so gc always keeps it "
        "(repeatable; with --dry-run, only previewed).", show_default=False)] = None,
    unpin: Annotated[list[str] | None, typer.Option(
        "--unpin", help="Remove a step's pin (repeatable; with --dry-run, only previewed).",
        show_default=False)] = None,
    note: Annotated[str, typer.Option("--note", help="Why the --pin steps are pinned (kept in the pin).")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Delete what no deployed version, pin, running step or recent job needs from the artifact store."""

    def run() -> gc.GcReport:
        from shared.settings import get_settings
        from shared.storage import open_store

        settings = get_settings()
        older_than_s = (gc.parse_duration(older_than, "--older-than") if older_than is not None
                        else settings.job_retention_days * 86400)
        grace_s = gc.parse_duration(grace, "--grace") if grace is not None else float(settings.gc_grace_s)
        jobs = api.connect(settings)
        store = open_store(settings.resolved_artifact_store())
        pinned = [gc.resolve_step(store, ref) for ref in pin or []]
        unpinned = [gc.resolve_step(store, ref) for ref in unpin or []]
        if not dry_run:
            for step in pinned:
                gc.pin(store, step, note=note)
            for step in unpinned:
                gc.unpin(store, step)
        return gc.collect(store, jobs, older_than_s=older_than_s, grace_s=grace_s,
                          record_retention_s=settings.job_retention_days * 86400, repositories=repository or [],
                          extra_pins=pinned, ignored_pins=unpinned, dry_run=dry_run)

    def guarded() -> gc.GcReport:
        try:
            return run()
        except UserInputError:
            raise
        except ModelyardError as exc:  # storage unreachable: nothing more was deleted
            raise fail(f"artifact store: {exc}", EXIT_UNAVAILABLE) from None

    report = guard(guarded)
    if as_json:
        console.print_json(json.dumps(report.to_dict()))
    else:
        print_report(report)


def print_report(report: gc.GcReport) -> None:
    verb = "would delete" if report.dry_run else "deleted"
    console.print(f"{escape(report.store)}: scanned {report.scanned.objects} objects "
                  f"({human_bytes(report.scanned.bytes)}); {verb} {report.deleted.objects} "
                  f"({human_bytes(report.deleted.bytes)})", highlight=False)
    table = Table("kept because", "objects", "size", title="kept")
    for reason in gc.REASONS:
        if reason in report.kept:
            tally = report.kept[reason]
            table.add_row(reason, str(tally.objects), human_bytes(tally.bytes))
    if report.kept:
        console.print(table)
    console.print(f"{report.deployed_versions} deployed version(s) in {len(report.repositories)} repository(ies); "
                  f"{len(report.pinned_steps)} pinned step(s); {report.leased_steps} step(s) under a lease; "
                  f"{report.jobs_kept} job(s) kept; job records {'to drop' if report.dry_run else 'dropped'}: "
                  f"{report.job_records_dropped}", highlight=False)
