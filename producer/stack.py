"""The local stack behind ``modelyard up``: a private Redis, a cpu worker, a gpu worker, Flower.

Everything listens on loopback only; Redis and Flower get generated passwords. The stack's
URLs are recorded in ``$MODELYARD_HOME/stack.json`` (mode 0600) so that ``modelyard submit``
in another shell finds it; ``modelyard down`` (or Ctrl-C on a foreground ``up``) stops it all.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.redis_server import free_port, start_redis
from shared.settings import Settings


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
            raise RuntimeError(f"a local stack is already running (pid {existing['pid']}); 'modelyard down' stops it")
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
            "logs": str(logs),
        }
        stack_file = self.settings.stack_file
        stack_file.touch(mode=0o600)
        stack_file.write_text(json.dumps(self.info, indent=1))
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
                    raise RuntimeError(f"a stack process exited early (pid {proc.pid}); logs: {self.info['logs']}")
            if len(app.control.ping(timeout=1.0)) >= expected:
                return
        raise RuntimeError(f"workers did not come up within {timeout} s; logs: {self.info['logs']}")

    def stop(self) -> None:
        stop_pids([p.pid for p in reversed(self.processes)])
        self.settings.stack_file.unlink(missing_ok=True)


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
    if info and _alive(info.get("pid", -1)):
        return info
    return None


def stop_running(settings: Settings) -> bool:
    info = settings.local_stack()
    if not info:
        return False
    if _alive(info.get("pid", -1)) and info["pid"] != os.getpid():
        os.kill(info["pid"], signal.SIGTERM)  # the foreground 'up' stops its children itself
        deadline = time.monotonic() + 40
        while _alive(info["pid"]) and time.monotonic() < deadline:
            time.sleep(0.2)
    stop_pids(info.get("pids", []), timeout=5)
    settings.stack_file.unlink(missing_ok=True)
    return True
