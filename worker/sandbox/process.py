"""The sandbox as a process: start ``worker.sandbox.child`` under bwrap, wait for it, stop it.

The parent polls for the sandbox's end, kills it at the wall-clock limit, and kills it too when
the wait is interrupted (Celery's soft time limit, a revoked task): nothing outlives the call.
The child's output goes to a log file outside its scratch folder, whose tail explains a crash.
(Resource usage does not cross bwrap's pid namespace: the child reports its own figures.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shared.settings import Settings
from worker.sandbox import bubblewrap
from worker.sandbox.limits import Limits

LOG_TAIL = 4000  # characters of the sandbox's output kept for a crash message and the worker log


@dataclass
class Finished:
    returncode: int  # 128 + N when the child was killed by signal N, as bwrap reports it
    seconds: float
    log_tail: str
    timed_out: bool


@dataclass
class Started:
    """A sandbox whose child is running (or waiting for its request, when started warm)."""

    process: subprocess.Popen
    log_path: Path
    started: float


def run_child(box: Path, settings: Settings, *, source: Path, workdir: Path, privileged: bool,
              limits: Limits, probe: bool = False) -> Finished:
    """Start ``worker.sandbox.child`` under bwrap and wait for the whole sandbox to end."""
    return finish_child(start_child(box, settings, source=source, workdir=workdir, privileged=privileged,
                                    probe=probe), limits.wall_s)


def start_child(box: Path, settings: Settings, *, source: Path, workdir: Path, privileged: bool,
                probe: bool = False, warm: bool = False) -> Started:
    """Start ``worker.sandbox.child`` under bwrap; ``warm``: it imports the frameworks, then waits for
    its request (``warm.WarmBox``)."""
    environ = dict(os.environ)
    hidden = bubblewrap.hidden_folders(settings, environ)
    argv = [sys.executable, "-s", "-B", "-m", "worker.sandbox.child", str(bubblewrap.INSIDE / "io")]
    argv += ["--probe"] if probe else []
    argv += ["--warm"] if warm else []
    command = bubblewrap.command(
        box, source=source, workdir=workdir, hidden=hidden, needed=bubblewrap.needed_paths(environ),
        secrets=bubblewrap.secret_files(settings, environ), argv=argv, privileged=privileged,
    )
    log_path = box.parent / f"{box.name}.log"
    with open(log_path, "wb") as output:
        process = subprocess.Popen(command, env=bubblewrap.child_env(environ), stdin=subprocess.DEVNULL,
                                   stdout=output, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    return Started(process=process, log_path=log_path, started=time.monotonic())


def finish_child(started: Started, wall_s: float) -> Finished:
    """Wait (at most wall_s from now) for the sandbox to end; its exit, time and log tail."""
    began = time.monotonic()
    timed_out = _wait(started.process, wall_s)
    tail = _tail(started.log_path)
    started.log_path.unlink(missing_ok=True)
    returncode = started.process.returncode
    return Finished(
        returncode=128 - returncode if returncode < 0 else returncode,  # bwrap itself killed (the wall limit)
        seconds=time.monotonic() - began,
        log_tail=tail,
        timed_out=timed_out,
    )


def stop_child(started: Started) -> None:
    """Kill a sandbox that will not be used (a warm one its worker gives up), and forget its log."""
    _kill(started.process)
    started.log_path.unlink(missing_ok=True)


def _wait(process: subprocess.Popen, wall_s: float) -> bool:
    """Wait for the sandbox to end; True when the wall-clock limit ended it. A poll, not a blocking
    wait, so that a signal (Celery's soft time limit) interrupts it and the sandbox is killed too."""
    deadline = time.monotonic() + wall_s
    pause = 0.005
    try:
        while process.poll() is None:
            if time.monotonic() > deadline:
                _kill(process)
                return True
            time.sleep(pause)
            pause = min(pause * 2, 0.1)
    except BaseException:
        _kill(process)
        raise
    return False


def _kill(process: subprocess.Popen) -> None:
    """SIGKILL bwrap's process group and reap it; the sandbox dies with bwrap (--die-with-parent)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _tail(path: Path) -> str:
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - LOG_TAIL))
        return handle.read().decode(errors="replace")


