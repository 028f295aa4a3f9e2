"""Job commands: validate, submit, status, wait, cancel, report, run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from producer import api
from producer.cli.app import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_UNAVAILABLE,
    app,
    console,
    err,
    fail,
    guard,
)
from producer.cli.follow import follow, job_view, print_job, report_outcome
from producer.render import variants_table
from shared.jobspec import BASELINE, JobSpec

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
JobFile = Annotated[Path, typer.Argument(help="The job's YAML file.", show_default=False)]
JobId = Annotated[str, typer.Argument(help="The job id that submit printed.")]


@app.command()
def validate(
    job_file: Annotated[Path | None, typer.Argument(help="The job's YAML file.", show_default=False)] = None,
    as_json: JsonOption = False,
    schema: Annotated[bool, typer.Option("--schema", help="Print the job file's JSON Schema (for editors) "
                                         "and exit.")] = False,
) -> None:
    """Check a job file as submit would (schema, plugins and their parameters, local files); enqueue nothing."""
    if schema:
        console.print_json(json.dumps(JobSpec.model_json_schema()))
        return
    if job_file is None:
        raise fail("give a job file to validate, or --schema", EXIT_BAD_INPUT)
    try:
        spec = guard(lambda: api.validate(job_file))
    except typer.Exit:
        if as_json:  # the message is on stderr; a script reading stdout still gets an answer
            console.print_json(json.dumps({"ok": False, "job_file": str(job_file)}))
        raise
    plan = api.plan(spec)
    if as_json:
        console.print_json(json.dumps({"ok": True, "job_file": str(job_file), "stages": plan,
                                       "spec": spec.model_dump(mode="json")}))
        return
    console.print(f"OK {job_file}: model {spec.model.name} ({spec.model.format})", highlight=False, markup=False)
    for line in stage_summary(spec, plan):
        console.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)


def stage_summary(spec: JobSpec, plan: dict[str, str]) -> list[str]:
    """One line per stage the job would run, with its pool."""
    lines = []
    if spec.compress:
        prune = spec.compress.prune
        lines.append(f"compress [{plan['compress']}]: prune {prune.method} keep {prune.keep}"
                     + (f", distill {spec.compress.distill.epochs} epoch(s)" if spec.compress.distill else ""))
    lines.append(f"convert [{plan['convert']}]: to {spec.convert.to}, opset {spec.convert.opset}")
    if spec.optimize:
        for variant in [BASELINE, *spec.optimize.ids]:
            of = spec.optimize.variant(variant).of
            lines.append(f"optimize:{variant} [{plan[f'optimize:{variant}']}]" + (f": {of}" if of != variant else ""))
        gate = ", ".join(f"{k} {v}" for k, v in spec.optimize.gate.model_dump().items() if v is not None)
        lines.append(f"select [{plan['select']}]: gate {gate or 'none'}, objective {spec.optimize.objective}")
    if spec.deploy:
        lines.append(f"deploy [{plan['deploy']}]: {spec.deploy.repository} as '{spec.deploy.alias}'")
    return lines


@app.command()
def submit(
    job_file: JobFile,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the job until it ends.")] = False,
    as_json: JsonOption = False,
    timeout: Annotated[float, typer.Option(help="With --wait: give up after this many seconds (exit 4).")] = 3600,
) -> None:
    """Validate a job file, upload its model and enqueue its stages."""
    job_id = guard(lambda: api.submit(job_file))
    unserved = guard(lambda: api.unserved_target(job_file))
    if unserved:
        err.print(f"warning: no online worker consumes {unserved} (optimize.target); the job's select stage "
                  f"waits there until one does: modelyard worker --hardware-class {unserved.split('.', 1)[1]}",
                  highlight=False)
    if not wait:
        console.print_json(json.dumps({"job_id": job_id})) if as_json else console.print(f"submitted job {job_id}")
        return
    if not as_json:
        console.print(f"submitted job {job_id}", highlight=False)
    follow(job_id, as_json=as_json, timeout=timeout)


@app.command()
def status(job_id: JobId, as_json: JsonOption = False) -> None:
    """Show a job's stages, artifacts and metrics."""
    job = guard(lambda: api.status(job_id))
    if as_json:
        console.print_json(json.dumps(job, default=str))
    else:
        print_job(job)


@app.command()
def wait(
    job_id: JobId,
    as_json: JsonOption = False,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds (exit 4).")] = 3600,
) -> None:
    """Wait for a job to end; exit 0 only if it succeeded."""
    follow(job_id, as_json=as_json, timeout=timeout)


@app.command()
def report(
    job_id: JobId,
    html_path: Annotated[Path | None, typer.Option("--html", help="Also write the HTML report (with a "
                                                   "latency/size/fidelity chart) to this file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the variant table as JSON.")] = False,
) -> None:
    """Show a job's variant table (size, latency, speedup, fidelity, verdict); --html writes a chart too."""
    from producer.report import html_report, variant_rows

    job = guard(lambda: api.status(job_id))
    rows = variant_rows(job)
    if not rows:
        raise fail(f"job {job_id} has no variant table (no optimize stage, or it has not finished)", EXIT_BAD_INPUT)
    if as_json:
        console.print_json(json.dumps(rows, default=str))
    else:
        console.print(variants_table(job))
    if html_path is not None:
        try:
            html_path.write_text(html_report(job))
        except OSError as exc:
            raise fail(f"cannot write {html_path}: {exc.strerror}", EXIT_BAD_INPUT) from None
        err.print(f"HTML report: {html_path}", highlight=False)


@app.command()
def cancel(job_id: JobId) -> None:
    """Cancel a job: its remaining stages do not run and nothing is deployed."""
    changed = guard(lambda: api.cancel(job_id))
    console.print(f"job {job_id} cancelled" if changed else f"job {job_id} had already ended")


@app.command()
def run(job_file: JobFile, as_json: JsonOption = False) -> None:
    """Run a job's stages here, without Redis or workers; same steps, step cache and report as submit --wait."""
    from producer.local import LocalRunFailed, run_local

    guard(lambda: api.validate(job_file))  # a bad job file fails here, before a runner starts

    def running() -> dict:
        with job_view(as_json=as_json) as show:
            return run_local(job_file, on_update=show)

    try:
        job = guard(running)
    except LocalRunFailed as exc:
        raise fail(str(exc), EXIT_UNAVAILABLE) from None
    except KeyboardInterrupt:
        raise fail("interrupted: the local run stopped", EXIT_INTERRUPTED) from None
    report_outcome(job, as_json=as_json)
