"""Flower, as operators see it: a real headless Chromium logs in and reads the workers and tasks pages.

The stack here is the test cluster (one ``cpu`` and one ``gpu`` worker process on a private Redis)
plus Flower started exactly as ``modelyard up`` starts it (``producer.stack.flower_command``),
with basic auth on a free loopback port. One small demo job (a tiny ONNX model, convert → optimize
fp32 + fp16 → select, ``device: gpu`` so fp16 runs on the gpu pool) gives Flower stage tasks on
both pools to show.

Chromium is Debian's ``chromium`` package (``.ci/run`` installs it), driven by Playwright's Python
client with ``executable_path`` — Playwright's own browser download is never used. Without
``/usr/bin/chromium`` the browser tests skip locally and fail under ``CI=true``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from producer import api
from producer.stack import flower_command
from shared.redis_server import free_port
from tests.services import ROOT

pytestmark = pytest.mark.integration

HOST = socket.gethostname()
STAGE_TASKS = {"modelyard.convert", "modelyard.optimize", "modelyard.select"}
STEP_KEY = re.compile(r"[0-9a-f]{64}")


@dataclass
class Flower:
    """One Flower process on the test broker; ``restart`` keeps its persistent db."""

    env: dict[str, str]
    folder: Path
    user: str = "admin"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db(self) -> Path:
        return self.folder / "flower.db"

    def start(self) -> None:
        self.port = free_port()
        env = {**self.env, "FLOWER_BASIC_AUTH": f"{self.user}:{self.password}"}
        with open(self.folder / "flower.log", "ab") as log:
            self.process = subprocess.Popen(flower_command(self.db, self.port), cwd=ROOT, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        self.wait_until(lambda: self.get("/healthcheck", auth=False) == "OK", "answered /healthcheck")
        self.started = time.monotonic()  # its enable_events timer runs from here

    def stop(self) -> None:
        """SIGTERM: Flower saves its state to the db on the way out."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def get(self, path: str, *, auth: bool = True) -> str | None:
        request = urllib.request.Request(self.url + path)
        if auth:
            token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=5) as reply:
                return reply.read().decode()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def tasks(self, job_id: str) -> dict[str, dict]:
        """Flower's record of the job's tasks (from its /api/tasks), by task id."""
        text = self.get("/api/tasks?limit=1000")
        tasks = json.loads(text) if text else {}
        return {tid: t for tid, t in tasks.items() if f"'job_id': '{job_id}'" in (t.get("kwargs") or "")}

    def online_workers(self) -> set[str]:
        text = self.get("/metrics", auth=False) or ""
        return set(re.findall(r'^flower_worker_online\{worker="([^"]+)"\} 1\.0$', text, re.MULTILINE))

    def wait_until(self, condition, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process and self.process.poll() is not None:
                raise RuntimeError(f"flower exited:\n{self.log()}")
            if condition():
                return
            time.sleep(0.3)
        raise AssertionError(f"flower never {what} within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        log = self.folder / "flower.log"
        return log.read_text(errors="replace")[-3000:] if log.exists() else ""


@pytest.fixture(scope="module")
def flower(cluster, service_env, tmp_path_factory):
    flower = Flower(env=service_env, folder=tmp_path_factory.mktemp("flower"))
    flower.start()
    try:
        # Heartbeats from both pools prove Flower receives events before the demo job is sent.
        workers = {f"cpu@{HOST}", f"gpu@{HOST}"}
        flower.wait_until(lambda: workers <= flower.online_workers(), f"saw workers {workers} online")
        # Workers send task events only once a monitor asks (MODELYARD_TASK_EVENTS is off): Flower
        # broadcasts enable_events every 5 s from its start, so give its first broadcast time to land.
        time.sleep(max(0.0, flower.started + 6.5 - time.monotonic()))
        yield flower
    finally:
        flower.stop()


def tiny_mlp(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(6)
    w1 = helper.make_tensor("w1", TensorProto.FLOAT, [8, 16], rng.standard_normal(128).astype(np.float32).tolist())
    w2 = helper.make_tensor("w2", TensorProto.FLOAT, [16, 4], rng.standard_normal(64).astype(np.float32).tolist())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "demo",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [w1, w2],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def demo_job(flower, producer_env, tmp_path_factory) -> dict:
    """A finished demo job, once Flower has recorded the success of each of its stage tasks."""
    folder = tmp_path_factory.mktemp("demo-job")
    tiny_mlp(folder / "demo.onnx")
    (folder / "demo.yaml").write_text(
        "model: {name: flower-demo, source: ./demo.onnx, format: onnx}\n"
        "optimize: {variants: [fp16], objective: size}\n"
        "device: gpu\n"
    )
    job = api.wait(api.submit(folder / "demo.yaml"), timeout=300)
    assert job["state"] == "SUCCEEDED", job.get("error")

    def all_stages_succeeded() -> bool:
        tasks = flower.tasks(job["id"]).values()
        return len(tasks) == 4 and all(t["state"] == "SUCCESS" for t in tasks)

    flower.wait_until(all_stages_succeeded, f"recorded the 4 stage tasks of job {job['id']} as SUCCESS")
    return job




@pytest.fixture
def page(browser, flower):
    context = browser.new_context(http_credentials={"username": flower.user, "password": flower.password},
                                  viewport={"width": 1600, "height": 600})
    try:
        yield context.new_page()
    finally:
        context.close()


def test_stage_tasks_show_job_model_stage_and_variant_instead_of_step_keys(flower, demo_job):
    tasks = list(flower.tasks(demo_job["id"]).values())
    shown = {(t["name"], json.dumps(t["kwargs"])) for t in tasks}
    assert {t["name"] for t in tasks} == STAGE_TASKS
    for task in tasks:
        kwargs = task["kwargs"]
        assert "'model': 'flower-demo'" in kwargs, shown
        assert f"'stage': '{task['name'].split('.')[1]}'" in kwargs, shown
        assert not STEP_KEY.search(task["args"] or ""), task["args"]
    variants = sorted(re.search(r"'variant': '([^']+)'", t["kwargs"]).group(1)
                      for t in tasks if t["name"] == "modelyard.optimize")
    assert variants == ["fp16", "fp32"]


def test_workers_page_in_chromium_lists_the_cpu_and_gpu_pool_workers(page, flower, demo_job, tmp_path):
    page.goto(f"{flower.url}/workers")
    table = page.locator("table")
    table.get_by_text(f"cpu@{HOST}").first.wait_for(timeout=30_000)
    table.get_by_text(f"gpu@{HOST}").first.wait_for(timeout=30_000)
    page.screenshot(path=tmp_path / "flower-workers.png", full_page=True)
    assert (tmp_path / "flower-workers.png").stat().st_size > 0


def test_tasks_page_in_chromium_lists_the_jobs_stage_tasks_on_both_pools(page, flower, demo_job, tmp_path):
    page.goto(f"{flower.url}/tasks")
    rows = page.locator("#tasks-table tbody tr").filter(has_text=demo_job["id"])
    rows.first.wait_for(timeout=30_000)
    expected = ["modelyard.convert", "modelyard.optimize", "modelyard.optimize", "modelyard.select"]
    page.wait_for_function(f"() => [...document.querySelectorAll('#tasks-table tbody tr')]"
                           f".filter(r => r.innerText.includes('{demo_job['id']}')).length >= {len(expected)}",
                           timeout=30_000)
    texts = rows.all_inner_texts()
    assert sorted(name for text in texts for name in STAGE_TASKS if name in text) == expected
    fp16 = next(text for text in texts if "'variant': 'fp16'" in text)
    assert f"gpu@{HOST}" in fp16
    convert = next(text for text in texts if "modelyard.convert" in text)
    assert f"cpu@{HOST}" in convert
    page.screenshot(path=tmp_path / "flower-tasks.png", full_page=True)
    assert (tmp_path / "flower-tasks.png").stat().st_size > 0


def test_flower_keeps_the_jobs_tasks_across_a_restart(flower, demo_job):
    before = {tid: t["state"] for tid, t in flower.tasks(demo_job["id"]).items()}
    flower.restart()
    after = {tid: t["state"] for tid, t in flower.tasks(demo_job["id"]).items()}
    assert len(before) == 4
    assert after == before
