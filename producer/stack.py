"""The local stack behind ``modelyard up``: a private Redis, a cpu worker, a gpu worker, Flower.

Everything listens on loopback only; Redis and Flower get generated passwords. The stack's
URLs are recorded in ``$MODELYARD_HOME/stack.json`` (mode 0600) so that ``modelyard submit``
in another shell finds it; ``modelyard down`` (or Ctrl-C on a foreground ``up``) stops it all.

``run_foreground`` and ``start_detached`` are what ``modelyard up`` calls; they report through
callbacks and raise ``StackFailed`` (the stack could not start) or ``UserInputError`` (it
should not be started), so that the command only renders.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import UserInputError
from shared.redis_server import free_port, start_redis
from shared.settings import Settings

READY_TIMEOUT_S = 180  # a detached stack's workers answering a ping, from its start


class StackFailed(Exception):
    """The local stack did not start or a process of it died; the message says where its logs are."""


@dataclass
class Stack:
    settings: Settings
    cpu_workers: int = 1
    gpu_workers: int = 1
    flower: bool = True
    processes: list[subprocess.Popen] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.settings.home_dir

    def start(self) -> dict:
        self.folder.mkdir(parents=True, exist_ok=True)
        existing = running_stack(self.settings)
        if existing:
            raise UserInputError(f"a local stack is already running (pid {existing['pid']}); 'modelyard down' stops it")
        redis_server = start_redis(self.folder / "redis")
        self.processes.append(redis_server.process)
        artifacts = self.settings.artifact_store or (self.folder / "artifacts").resolve().as_uri()
        env = {**os.environ, "MODELYARD_BROKER_URL": redis_server.url, "MODELYARD_ARTIFACT_STORE": artifacts,
               "MODELYARD_HOME": str(self.folder)}
        logs = self.folder / "logs"
        logs.mkdir(exist_ok=True)
        for pool, count in (("cpu", self.cpu_workers), ("gpu", self.gpu_workers)):
            for index in range(count):
                name = f"{pool}{index + 1}@%h"
                args = [sys.executable, "-m", "producer", "worker", "--pool", pool, "--name", name,
                        "--concurrency", "1"]
                if pool == "gpu":
                    args.append("--allow-cpu")
                self.processes.append(_spawn(args, env, logs / f"worker-{pool}{index + 1}.log"))
        flower_user, flower_password, flower_port = "admin", secrets.token_urlsafe(12), free_port()
        if self.flower:
            args = flower_command(self.folder / "flower.db", flower_port)
            flower_env = {**env, "FLOWER_BASIC_AUTH": f"{flower_user}:{flower_password}"}
            self.processes.append(_spawn(args, flower_env, logs / "flower.log"))
        self.info = {
            "pid": os.getpid(),
            "broker_url": redis_server.url,
            "artifact_store": artifacts,
            "flower_url": f"http://127.0.0.1:{flower_port}" if self.flower else None,
            "flower_user": flower_user,
            "flower_password": flower_password,
            "pids": [p.pid for p in self.processes],
            # A pid alone may name another process by the time 'modelyard down' reads this file.
            "starts": {str(pid): start_time(pid) for pid in [os.getpid(), *(p.pid for p in self.processes)]},
            "logs": str(logs),
        }
        write_private(self.settings.stack_file, json.dumps(self.info, indent=1))
        return self.info

    def wait_ready(self, timeout: float = 120) -> None:
        """Block until every worker answers a ping."""
        from shared.celery_app import make_celery

        app = make_celery(self.settings, broker_url=self.info["broker_url"])
        expected = self.cpu_workers + self.gpu_workers
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.processes:
                if proc.poll() is not None:
                    raise StackFailed(f"a stack process exited early (pid {proc.pid}); logs: {self.info['logs']}")
            if len(app.control.ping(timeout=1.0)) >= expected:
                return
        raise StackFailed(f"workers did not come up within {timeout} s; logs: {self.info['logs']}")

    def stop(self) -> None:
        stop_pids([p.pid for p in reversed(self.processes)])
        self.settings.stack_file.unlink(missing_ok=True)


def refuse_with_a_broker(settings: Settings) -> None:
    if settings.broker_url:
        raise UserInputError("MODELYARD_BROKER_URL is set: 'up' starts its own Redis; unset it to use the local stack")


def run_foreground(settings: Settings, *, cpu_workers: int, gpu_workers: int, flower: bool,
                   on_ready: Callable[[dict], None], on_lost: Callable[[], None]) -> None:
    """Start the stack, call ``on_ready(info)``, and keep it until Ctrl-C, SIGTERM or a process dies.

    The stack is stopped whichever way this returns; a start that failed raises StackFailed.
    """
    refuse_with_a_broker(settings)
    stack = Stack(settings, cpu_workers=cpu_workers, gpu_workers=gpu_workers, flower=flower)
    stopping = False

    def on_sigterm(signum, frame):  # 'modelyard down' from another shell: stop like Ctrl-C
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        info = stack.start()  # UserInputError when another stack runs: nothing of this one to stop
        stack.wait_ready()
        info["ready"] = True
        write_private(settings.stack_file, json.dumps(info, indent=1))
        on_ready(info)
        while all(p.poll() is None for p in stack.processes):
            time.sleep(1)
        on_lost()
    except KeyboardInterrupt:
        pass
    except RuntimeError as exc:  # start_redis: no redis-server, or it did not start
        raise StackFailed(str(exc)) from None
    finally:
        if stack.processes:
            stack.stop()


def start_detached(settings: Settings, *, cpu_workers: int, gpu_workers: int, flower: bool) -> dict:
    """Start ``modelyard up`` in the background (log in ``$MODELYARD_HOME/up.log``); its info once ready."""
    refuse_with_a_broker(settings)
    existing = running_stack(settings)
    if existing:
        raise UserInputError(f"a local stack is already running (pid {existing['pid']})")
    args = [sys.executable, "-m", "producer", "up", f"--cpu-workers={cpu_workers}",
            f"--gpu-workers={gpu_workers}", "--flower" if flower else "--no-flower"]
    settings.home_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.home_dir / "up.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        info = settings.local_stack()
        if info and info.get("ready"):
            return info
        if proc.poll() is not None:
            raise StackFailed(f"the stack failed to start; see {log_path}")
        time.sleep(0.3)
    raise StackFailed(f"the stack did not become ready; see {log_path}")


# What the tasks page shows: the stage tasks' job id, model, stage and variant are in kwargs/args.
FLOWER_TASK_COLUMNS = "name,kwargs,args,state,worker,runtime,received,uuid"


def flower_command(db: Path, port: int, address: str = "127.0.0.1") -> list[str]:
    """Flower for the stack: persistent (state saved every minute and on SIGTERM), bounded task count.

    Basic auth comes from ``FLOWER_BASIC_AUTH`` in its environment, never from the command line.
    """
    return [sys.executable, "-m", "celery", "-A", "worker.app", "flower", f"--port={port}",
            f"--address={address}", "--persistent=True", f"--db={db}", "--state_save_interval=60000",
            "--max_tasks=10000", "--purge_offline_workers=300", f"--tasks_columns={FLOWER_TASK_COLUMNS}"]


def _spawn(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner may read (the stack file holds the Redis and Flower passwords),
    also when it already existed with a wider mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # fields after the command name, which may hold spaces


def ours(pid: int, starts: dict) -> bool:
    """Whether pid is still the process the stack file recorded (not a later process given its number)."""
    recorded = starts.get(str(pid))
    return recorded is not None and start_time(pid) == recorded


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def stop_pids(pids: list[int], timeout: float = 30) -> None:
    """SIGTERM each process group (warm shutdown for workers), then SIGKILL what remains."""
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def running_stack(settings: Settings) -> dict | None:
    info = settings.local_stack()
    if info and _alive(info.get("pid", -1)) and ours(info["pid"], info.get("starts", {})):
        return info
    return None


def stop_running(settings: Settings) -> bool:
    """Stop the stack the stack file records; a recorded pid now owned by another process is left alone."""
    info = settings.local_stack()
    if not info:
        return False
    starts = info.get("starts", {})
    if ours(info.get("pid", -1), starts) and _alive(info["pid"]) and info["pid"] != os.getpid():
        os.kill(info["pid"], signal.SIGTERM)  # the foreground 'up' stops its children itself
        deadline = time.monotonic() + 40
        while _alive(info["pid"]) and time.monotonic() < deadline:
            time.sleep(0.2)
    stop_pids([pid for pid in info.get("pids", []) if ours(pid, starts)], timeout=5)
    settings.stack_file.unlink(missing_ok=True)
    return True
