"""The ``modelyard`` command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live

from producer import api
from producer.render import stages_table, summary_lines, variants_table
from shared.errors import UserInputError
from shared.settings import get_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Convert, optimize and deploy trained models.")
console = Console(width=None if Console().is_terminal else 160)
err = Console(stderr=True, width=None if Console(stderr=True).is_terminal else 160)

EXIT_BAD_INPUT, EXIT_UNAVAILABLE, EXIT_JOB_FAILED = 2, 3, 1


def _fail(message: str, code: int) -> typer.Exit:
    err.print(f"[red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def _guard(fn):
    try:
        return fn()
    except UserInputError as exc:
        raise _fail(str(exc), EXIT_BAD_INPUT) from None
    except api.BrokerUnavailable as exc:
        raise _fail(f"{exc}. Is Redis running? Start the local stack with 'modelyard up' "
                    "or set MODELYARD_BROKER_URL.", EXIT_UNAVAILABLE) from None


def _print_job(job: dict) -> None:
    console.print(stages_table(job))
    variants = variants_table(job)
    if variants is not None:
        console.print(variants)
    for line in summary_lines(job):
        console.print(line, highlight=False)


@app.command()
def submit(
    job_file: Annotated[Path, typer.Argument(help="The job's YAML file.")],
    wait: Annotated[bool, typer.Option("--wait", help="Follow the job until it ends.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    timeout: Annotated[float, typer.Option(help="With --wait: give up after this many seconds.")] = 3600,
) -> None:
    """Validate a job file, upload its model and enqueue its stages."""
    job_id = _guard(lambda: api.submit(job_file))
    if not wait:
        console.print_json(json.dumps({"job_id": job_id})) if as_json else console.print(f"submitted job {job_id}")
        return
    _follow(job_id, as_json=as_json, timeout=timeout)


def _follow(job_id: str, *, as_json: bool, timeout: float) -> None:
    if as_json or not console.is_terminal:
        job = _guard(lambda: api.wait(job_id, timeout=timeout))
    else:
        with Live(console=console, refresh_per_second=4, transient=True) as live:
            job = _guard(lambda: api.wait(job_id, timeout=timeout, on_update=lambda j: live.update(stages_table(j))))
    if as_json:
        console.print_json(json.dumps(job, default=str))
    else:
        _print_job(job)
    if job["state"] != "SUCCEEDED":
        raise typer.Exit(EXIT_JOB_FAILED)


@app.command()
def status(
    job_id: Annotated[str, typer.Argument(help="The job id that submit printed.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Show a job's stages, artifacts and metrics."""
    job = _guard(lambda: api.status(job_id))
    if as_json:
        console.print_json(json.dumps(job, default=str))
    else:
        _print_job(job)


@app.command()
def wait(
    job_id: Annotated[str, typer.Argument(help="The job id.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 3600,
) -> None:
    """Wait for a job to end; exit 0 only if it succeeded."""
    _follow(job_id, as_json=as_json, timeout=timeout)


@app.command()
def report(
    job_id: Annotated[str, typer.Argument(help="The job id.")],
    html_path: Annotated[Path | None, typer.Option("--html", help="Write the HTML report (with chart) here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the variant table as JSON.")] = False,
) -> None:
    """Show a job's variant table (size, latency, speedup, fidelity, verdict) and write an HTML chart."""
    from producer.report import html_report, variant_rows

    job = _guard(lambda: api.status(job_id))
    rows = variant_rows(job)
    if not rows:
        raise _fail(f"job {job_id} has no variant table (no optimize stage, or it has not finished)", EXIT_BAD_INPUT)
    if as_json:
        console.print_json(json.dumps(rows, default=str))
    else:
        console.print(variants_table(job))
    target = html_path or Path(f"modelyard-report-{job_id}.html")
    target.write_text(html_report(job))
    err.print(f"HTML report: {target}", highlight=False)


@app.command()
def cancel(job_id: Annotated[str, typer.Argument(help="The job id.")]) -> None:
    """Cancel a job: its remaining stages do not run and nothing is deployed."""
    changed = _guard(lambda: api.cancel(job_id))
    console.print(f"job {job_id} cancelled" if changed else f"job {job_id} had already ended")


@app.command()
def up(
    cpu_workers: Annotated[int, typer.Option(min=0, help="Workers on the cpu queue.")] = 1,
    gpu_workers: Annotated[int, typer.Option(min=0, help="Workers on the gpu queue.")] = 1,
    detach: Annotated[bool, typer.Option("--detach", help="Start in the background and return.")] = False,
    flower: Annotated[bool, typer.Option(help="Start Flower too.")] = True,
) -> None:
    """Start a local stack: private Redis, cpu and gpu workers, Flower (loopback only)."""
    from producer.stack import Stack, running_stack

    settings = get_settings()
    if settings.broker_url:
        raise _fail("MODELYARD_BROKER_URL is set: 'up' starts its own Redis; unset it to use the local stack",
                    EXIT_BAD_INPUT)
    if detach:
        existing = running_stack(settings)
        if existing:
            raise _fail(f"a local stack is already running (pid {existing['pid']})", EXIT_BAD_INPUT)
        args = [sys.executable, "-m", "producer", "up", f"--cpu-workers={cpu_workers}",
                f"--gpu-workers={gpu_workers}", "--flower" if flower else "--no-flower"]
        settings.home_dir.mkdir(parents=True, exist_ok=True)
        with open(settings.home_dir / "up.log", "ab") as log:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            info = settings.local_stack()
            if info and info.get("ready"):
                _print_stack(info)
                return
            if proc.poll() is not None:
                raise _fail(f"the stack failed to start; see {settings.home_dir / 'up.log'}", EXIT_UNAVAILABLE)
            time.sleep(0.3)
        raise _fail(f"the stack did not become ready; see {settings.home_dir / 'up.log'}", EXIT_UNAVAILABLE)

    stack = Stack(settings, cpu_workers=cpu_workers, gpu_workers=gpu_workers, flower=flower)
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        info = stack.start()
        stack.wait_ready()
        info["ready"] = True
        settings.stack_file.write_text(json.dumps(info, indent=1))
        _print_stack(info)
        console.print("stack running; Ctrl-C or 'modelyard down' stops it")
        while all(p.poll() is None for p in stack.processes):
            time.sleep(1)
        err.print("[red]a stack process exited; stopping the stack[/]")
    except KeyboardInterrupt:
        pass
    except RuntimeError as exc:
        err.print(f"[red]error:[/] {exc}")
        stack.stop()
        raise typer.Exit(EXIT_UNAVAILABLE) from None
    stack.stop()


def _print_stack(info: dict) -> None:
    console.print(f"redis: 127.0.0.1 (password in {get_settings().stack_file})", highlight=False)
    console.print(f"artifacts: {info['artifact_store']}", highlight=False)
    if info.get("flower_url"):
        console.print(f"flower: {info['flower_url']}  user {info['flower_user']}  password "
                      f"{info['flower_password']}", highlight=False)
    console.print(f"logs: {info['logs']}", highlight=False)


@app.command()
def down() -> None:
    """Stop the local stack that 'modelyard up' started."""
    from producer.stack import stop_running

    console.print("local stack stopped" if stop_running(get_settings()) else "no local stack is running")


@app.command()
def worker(
    pool: Annotated[str, typer.Option(help="Queue to consume: cpu or gpu.")] = "cpu",
    name: Annotated[str, typer.Option(help="Worker node name.")] = "",
    concurrency: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    allow_cpu: Annotated[bool, typer.Option("--allow-cpu", help="Let a gpu worker run without CUDA.")] = False,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    recycle_after: Annotated[int, typer.Option(min=1, help="gpu pool: replace a worker process after this many "
                                               "tasks, releasing its GPU memory.")] = 20,
) -> None:
    """Run a worker for one pool (replaces this process with the Celery worker).

    A gpu worker runs one process per visible GPU (CUDA_VISIBLE_DEVICES, else nvidia-smi), each
    pinned to its GPU; --concurrency applies only where no GPU is visible (--allow-cpu).
    """
    if pool not in ("cpu", "gpu"):
        raise _fail(f"--pool must be cpu or gpu, not {pool!r}", EXIT_BAD_INPUT)
    if pool == "gpu":
        from worker.gpu import GPU_DEVICES_ENV, cuda_providers, visible_gpus

        gpus = visible_gpus()  # in subprocesses: CUDA is never initialized in the worker's parent
        if gpus:
            concurrency = len(gpus)
            os.environ[GPU_DEVICES_ENV] = ",".join(gpus)
        else:
            os.environ.pop(GPU_DEVICES_ENV, None)
        providers = cuda_providers()
        if not providers and not allow_cpu:
            raise _fail("no CUDA execution provider is available to ONNX Runtime; a gpu worker needs one "
                        "(install modelyard[gpu] on a machine with a GPU, or pass --allow-cpu to run on CPU)",
                        EXIT_BAD_INPUT)
        if not providers:
            err.print("[yellow]warning:[/] ONNX Runtime has no CUDA provider: this gpu-pool worker runs ONNX models "
                      "on the CPU (--allow-cpu)")
        if gpus:
            err.print(f"gpu pool: {len(gpus)} worker process(es), one per GPU ({', '.join(gpus)})", highlight=False)
    args = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q", pool, "-n", name or f"{pool}@%h",
            "-c", str(concurrency), f"--loglevel={loglevel}"]
    if pool == "gpu":
        args.append(f"--max-tasks-per-child={recycle_after}")
    os.execv(sys.executable, args)


# Commands kept in their own modules register themselves on ``app`` when imported.
from producer import cli_operations, cli_repository  # noqa: E402,F401


def main() -> None:
    app()
