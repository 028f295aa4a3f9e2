"""Real processes for the tests: a private Redis and Celery workers, each in its own process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class WorkerProcess:
    pool: str
    name: str
    process: subprocess.Popen
    log: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Cluster:
    """Workers sharing one broker and one artifact store."""

    env: dict[str, str]
    folder: Path
    workers: list[WorkerProcess] = field(default_factory=list)

    def start_worker(self, pool: str, name: str, *, concurrency: int = 1,
                     extra_env: dict | None = None, command_prefix: list[str] | None = None) -> WorkerProcess:
        """``command_prefix`` runs the worker under another command (``prlimit ... --``, a shell that
        joins a cgroup and execs the rest), which must exec it so that signals reach the worker."""
        log = self.folder / f"worker-{name.replace('@', '-')}.log"
        args = [*(command_prefix or []), sys.executable, "-m", "producer", "worker", "--pool", pool, "--name", name,
                "--concurrency", str(concurrency)]
        if pool == "gpu":
            args.append("--allow-cpu")
        with open(log, "ab") as out:
            process = subprocess.Popen(args, cwd=ROOT, env={**self.env, **(extra_env or {})}, stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        worker = WorkerProcess(pool=pool, name=name, process=process, log=log)
        self.workers.append(worker)
        return worker

    def wait_online(self, names: list[str], timeout: float = 90) -> None:
        from shared.celery_app import make_celery
        from shared.settings import Settings

        app = make_celery(Settings(), broker_url=self.env["MODELYARD_BROKER_URL"])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            online = {name for reply in app.control.ping(timeout=1.0) for name in reply}
            if set(names) <= online:
                return
            for worker in self.workers:
                if worker.process.poll() is not None:
                    raise RuntimeError(f"worker {worker.name} exited:\n{worker.log_text()[-3000:]}")
        raise RuntimeError(f"workers {names} not online after {timeout} s")

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
