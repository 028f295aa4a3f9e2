"""Local stack and worker commands: up, down, worker. The processes are ``producer.stack``'s."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from producer import stack
from producer.cli.app import EXIT_BAD_INPUT, EXIT_UNAVAILABLE, app, console, err, fail, guard
from shared.settings import get_settings


@app.command()
def up(
    cpu_workers: Annotated[int, typer.Option(min=0, help="Workers on the cpu queue.")] = 1,
    gpu_workers: Annotated[int, typer.Option(min=0, help="Workers on the gpu queue.")] = 1,
    detach: Annotated[bool, typer.Option("--detach", help="Start in the background and return.")] = False,
    flower: Annotated[bool, typer.Option(help="Start Flower too.")] = True,
) -> None:
    """Start a local stack: private Redis, cpu and gpu workers, Flower (loopback only)."""
    settings = get_settings()
    options = {"cpu_workers": cpu_workers, "gpu_workers": gpu_workers, "flower": flower}
    try:
        if detach:
            _print_stack(guard(lambda: stack.start_detached(settings, **options)))
            return

        def on_ready(info: dict) -> None:
            _print_stack(info)
            console.print("stack running; Ctrl-C or 'modelyard down' stops it")

        def on_lost() -> None:
            err.print("[red]a stack process exited; stopping the stack[/]")

        guard(lambda: stack.run_foreground(settings, **options, on_ready=on_ready, on_lost=on_lost))
    except stack.StackFailed as exc:
        raise fail(str(exc), EXIT_UNAVAILABLE) from None


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
    console.print("local stack stopped" if stack.stop_running(get_settings()) else "no local stack is running")


@app.command()
def worker(
    pool: Annotated[str, typer.Option(help="Queue to consume: cpu or gpu.")] = "cpu",
    name: Annotated[str, typer.Option(help="Worker node name.")] = "",
    concurrency: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    allow_cpu: Annotated[bool, typer.Option("--allow-cpu", help="Let a gpu worker run without CUDA.")] = False,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    recycle_after: Annotated[int, typer.Option(min=1, help="gpu pool: replace a worker process after this many "
                                               "tasks, releasing its GPU memory.")] = 20,
    hardware_class: Annotated[str, typer.Option(help="The class this worker advertises for optimize.target "
                                                "(default: detected, e.g. cpu-avx512-vnni).")] = "",
) -> None:
    """Run a worker for one pool (replaces this process with the Celery worker).

    A gpu worker runs one process per visible GPU (CUDA_VISIBLE_DEVICES, else nvidia-smi), each
    pinned to its GPU; --concurrency applies only where no GPU is visible (--allow-cpu).
    """
    if pool not in ("cpu", "gpu"):
        raise fail(f"--pool must be cpu or gpu, not {pool!r}", EXIT_BAD_INPUT)
    args = [sys.executable, "-m", "worker", "--pool", pool, "--concurrency", str(concurrency),
            "--loglevel", loglevel, "--recycle-after", str(recycle_after)]
    if name:
        args += ["--name", name]
    if allow_cpu:
        args.append("--allow-cpu")
    if hardware_class:
        args += ["--hardware-class", hardware_class]
    sys.stdout.flush()
    os.execv(sys.executable, args)  # python -m worker finds the GPUs, then becomes the Celery worker
