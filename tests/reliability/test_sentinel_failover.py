"""The broker behind Redis Sentinel loses its master (issue 20): a replica takes over and jobs carry on.

A master, one replica and three sentinels (tests/sentinel.py: the same redis-server binary,
``down-after-milliseconds`` 1000, ``failover-timeout`` 3000) and real worker processes; this
process is the producer. Every client takes the broker URL in its sentinel form
(``sentinel://...;sentinel://.../0?master_name=modelyard&sentinel_password=...``): the workers'
Celery consumer and publisher, the job store and step leases, the producer's submit / wait /
cancel, the fault plugin. The master is killed with SIGKILL, so it neither flushes nor says goodbye.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid

import pytest
import redis

from producer import api
from shared.broker import redis_client
from shared.celery_app import make_celery
from shared.jobs import RUNNING, JobStore
from shared.redis_server import free_port
from shared.repository import ModelRepository
from shared.settings import Settings, get_settings
from tests.plugins import fault
from tests.reliability.conftest import HOST, fault_job, report
from tests.sentinel import SentinelGroup, start_sentinel_group, wait_until
from tests.services import Cluster

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

SLEEP_S = 10  # the convert stage's length: the master dies 1 s into it, well before it ends


class SentinelStack:
    """A sentinel group, an artifact folder and worker processes, all on the broker URL's sentinel form."""

    def __init__(self, folder, monkeypatch) -> None:
        self.group: SentinelGroup = start_sentinel_group(folder / "sentinel")
        self.url = self.group.url
        self.env = {
            **os.environ,
            "MODELYARD_BROKER_URL": self.url,
            "MODELYARD_ARTIFACT_STORE": (folder / "artifacts").as_uri(),
            "MODELYARD_HOME": str(folder / "home"),
            "MODELYARD_PLUGIN_MODULES": "tests.plugins.fault",
            "MODELYARD_LEASE_TTL_S": "5",
            "MODELYARD_BENCH_RUNS": "3",
            "HF_HUB_OFFLINE": "1",
            "MODELYARD_STEP_SIGNING_KEY": "reliability-workers-key",
        }
        for key in ("MODELYARD_BROKER_URL", "MODELYARD_ARTIFACT_STORE", "MODELYARD_HOME",
                    "MODELYARD_PLUGIN_MODULES", "MODELYARD_LEASE_TTL_S"):
            monkeypatch.setenv(key, self.env[key])
        get_settings.cache_clear()
        self.cluster = Cluster(env=self.env, folder=folder)
        self.jobs = JobStore.from_url(self.url)

    def start_worker(self, name: str = "cpu1") -> None:
        worker = self.cluster.start_worker("cpu", f"{name}@{HOST}", concurrency=1)
        self.cluster.wait_online([worker.name])

    def runs(self, model: str) -> list[float]:
        """Start times of the fault-onnx convert stage of this model, read through the sentinels."""
        client = redis_client(self.url)
        try:
            return [json.loads(r)["started"] for r in client.lrange(fault.runs_key(model), 0, -1)]
        finally:
            client.close()

    def fail_over(self) -> tuple[int, float, float]:
        """Kill the master; returns (its port, seconds until the sentinels named another, until it took a write)."""
        killed_at = time.monotonic()
        old = self.group.kill_master()
        wait_until(lambda: self.group.master_port() not in (None, old), 60, "a replica promoted")
        promoted_s = time.monotonic() - killed_at
        client = redis_client(self.url, socket_connect_timeout=1, socket_timeout=2)
        wait_until(lambda: _writes(client), 60, "the new master took a write")
        return old, promoted_s, time.monotonic() - killed_at

    def logged_after(self, message: str, after: float) -> float | None:
        """When a worker's main process first logged ``message`` (a line's start) after ``after``, wall time."""
        line = re.compile(rf"^\[(\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{{3}}): INFO/MainProcess\] {re.escape(message)}",
                          re.MULTILINE)
        for worker in self.cluster.workers:
            for stamp, millis in line.findall(worker.log_text()):
                wall = time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000
                if wall > after:
                    return wall
        return None

    def stop(self) -> None:
        self.cluster.stop()
        self.group.stop()
        get_settings.cache_clear()


def _writes(client) -> bool:
    try:
        return bool(client.set("modelyard:test:failover-probe", "1"))
    except Exception:
        return False


def flower_connects(flower) -> int:
    """How often Flower's event receiver logged that it connected to the broker."""
    log = flower.folder / "flower.log"
    return log.read_text(errors="replace").count("Connected to sentinel://") if log.exists() else 0


@pytest.fixture
def sentinel_stack(tmp_path, monkeypatch):
    stack = SentinelStack(tmp_path, monkeypatch)
    yield stack
    stack.stop()


def test_master_killed_mid_stage_fails_over_and_the_job_deploys_exactly_one_version(sentinel_stack, tmp_path):
    stack = sentinel_stack
    stack.start_worker()
    repo = tmp_path / "repo"
    job = fault_job(tmp_path, "failover", {"action": "sleep", "seconds": SLEEP_S, "times": 1},
                    deploy=repo.as_uri())
    job_id = api.submit(job)
    wait_until(lambda: len(stack.runs("failover")) == 1, 120, "the convert stage started")
    time.sleep(1.0)  # the stage's first records and its lease are written; the master dies mid-stage
    state_at_kill = stack.jobs.state(job_id)
    killed_wall = time.time()

    old_port, promoted_s, writable_s = stack.fail_over()
    result = api.wait(job_id, timeout=240, poll=0.2)

    versions = ModelRepository.open(repo.as_uri()).versions("failover")
    starts = stack.runs("failover")
    convert = result["stages"].get("convert", {})
    stage_ends = sorted(s["finished"] for s in result["stages"].values() if s.get("finished"))
    first_record_after_kill_s = next((t - killed_wall for t in stage_ends if t > killed_wall), None)
    reconnected = stack.logged_after("Connected to sentinel://", killed_wall)
    report("S1 sentinel failover mid-stage", submitted=1, completed=int(result["state"] == "SUCCEEDED"),
           failed=int(result["state"] == "FAILED"), duplicated=len(starts) - 1,
           failover_promoted_s=round(promoted_s, 2), failover_writable_s=round(writable_s, 2),
           worker_consumer_back_s=round(reconnected - killed_wall, 2) if reconnected else None,
           first_stage_record_after_kill_s=round(first_record_after_kill_s, 2) if first_record_after_kill_s else None,
           convert_s=round(convert.get("finished", 0) - convert.get("started", 0), 2),
           job_s=round(result.get("finished", 0) - result.get("created", 0), 1), versions=versions,
           unacked_left=redis_client(stack.url).hlen("unacked"))
    assert state_at_kill == RUNNING
    assert stack.group.master_port() != old_port
    assert result["state"] == "SUCCEEDED", result.get("error")
    assert versions == [1]
    assert result["stages"]["deploy"]["version"] == 1
    assert convert["finished"] > killed_wall  # the stage that was running at the kill finished afterwards
    assert reconnected is not None  # the worker's consumer really lost the master and found the new one
    assert all(w.process.poll() is None for w in stack.cluster.workers)  # rode it out without a restart


def test_after_losing_the_masters_host_the_producer_submits_watches_and_cancels_jobs_on_the_new_master(
    sentinel_stack, tmp_path
):
    stack = sentinel_stack
    stack.start_worker()
    before = api.submit(fault_job(tmp_path, "before", seed=0))  # the producer's connections predate the kill
    assert api.wait(before, timeout=120, poll=0.2)["state"] == "SUCCEEDED"

    stack.group.kill_sentinel(0)  # the host's sentinel dies with the master: the one the URL lists first
    old_port, promoted_s, writable_s = stack.fail_over()
    started = time.monotonic()
    after = api.submit(fault_job(tmp_path, "after", seed=1))
    submit_s = time.monotonic() - started
    doomed = api.submit(fault_job(tmp_path, "doomed", {"action": "sleep", "seconds": 15}, seed=2))
    wait_until(lambda: len(stack.runs("doomed")) == 1, 120, "the doomed job's convert stage started")
    seen = api.status(doomed)["state"]
    cancelled = api.cancel(doomed)
    results = {job_id: api.wait(job_id, timeout=120, poll=0.2) for job_id in (after, doomed)}

    report("S2 master and first sentinel killed, then new jobs", submitted=3,
           completed=sum(r["state"] == "SUCCEEDED" for r in results.values()) + 1,
           failed=sum(r["state"] == "FAILED" for r in results.values()), duplicated=len(stack.runs("after")) - 1,
           cancelled=sum(r["state"] == "CANCELLED" for r in results.values()),
           failover_promoted_s=round(promoted_s, 2), failover_writable_s=round(writable_s, 2),
           first_submit_after_failover_s=round(submit_s, 2))
    assert stack.group.master_port() != old_port
    assert results[after]["state"] == "SUCCEEDED", results[after].get("error")
    assert seen == RUNNING and cancelled is True
    assert results[doomed]["state"] == "CANCELLED"


def test_flower_on_the_sentinel_url_follows_the_new_master_and_shows_a_later_jobs_tasks(sentinel_stack, tmp_path):
    from tests.browser.test_flower import Flower

    stack = sentinel_stack
    stack.start_worker()
    (tmp_path / "flower").mkdir()
    flower = Flower(env=stack.env, folder=tmp_path / "flower")
    flower.start()
    try:
        flower.wait_until(lambda: f"cpu1@{HOST}" in flower.online_workers(), "saw the worker online")
        wait_until(lambda: stack.logged_after("Events of group {task} enabled by remote", 0), 60,
                   "Flower turned the worker's task events on", interval=0.5)  # kept across reconnects
        connects = flower_connects(flower)
        stack.fail_over()
        # Flower's event receiver logs each (re)connection; once it is back, the job's events reach it.
        wait_until(lambda: flower_connects(flower) > connects, 90, "Flower's event receiver reconnected",
                   interval=0.5)
        job_id = api.submit(fault_job(tmp_path, "watched", seed=3))
        result = api.wait(job_id, timeout=120, poll=0.2)
        flower.wait_until(lambda: {t.get("state") for t in flower.tasks(job_id).values()} == {"SUCCESS"},
                          "showed the job's tasks as succeeded", timeout=90)
        queues = json.loads(flower.get("/api/queues/length") or "{}")
    finally:
        flower.stop()
    assert result["state"] == "SUCCEEDED", result.get("error")
    assert "cpu" in {q["name"] for q in queues.get("active_queues", [])}  # its broker view: queue lengths


def test_a_tls_sentinel_url_reaches_a_tls_only_master_from_clients_celery_and_the_result_backend(tmp_path):
    from tests.reliability.conftest import tls_redis_executable
    from tests.reliability.test_security import _certificates

    executable = tls_redis_executable()
    if executable is None or shutil.which("openssl") is None:
        pytest.skip("no redis-server built with TLS (or no openssl) on this machine")
    ca, cert, key = _certificates(tmp_path)
    tls = (f"tls-cert-file {cert}\ntls-key-file {key}\ntls-ca-cert-file {ca}\ntls-auth-clients no\n"
           "tls-replication yes\nport 0\nbind 127.0.0.1\n")  # port 0: no plain-text port at all
    password, sentinel_password = uuid.uuid4().hex, uuid.uuid4().hex
    master_port, sentinel_port = free_port(), free_port()
    (tmp_path / "master.conf").write_text(f"{tls}tls-port {master_port}\nrequirepass {password}\ndir {tmp_path}\n")
    (tmp_path / "sentinel.conf").write_text(
        f"{tls}tls-port {sentinel_port}\nrequirepass {sentinel_password}\ndir {tmp_path}\n"
        f"sentinel monitor tlsmaster 127.0.0.1 {master_port} 1\nsentinel auth-pass tlsmaster {password}\n")
    processes = [subprocess.Popen([executable, str(tmp_path / name), *extra], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
                 for name, extra in (("master.conf", []), ("sentinel.conf", ["--sentinel"]))]
    url = (f"sentinel://:{password}@127.0.0.1:{sentinel_port}/0?master_name=tlsmaster"
           f"&sentinel_password={sentinel_password}&ssl=true&ssl_ca_certs={ca}")
    try:
        client = redis_client(url, socket_connect_timeout=2, socket_timeout=5)
        wait_until(lambda: _writes(client), 30, "the TLS master answered through the TLS sentinel")
        app = make_celery(Settings(), broker_url=url)
        app.send_task("modelyard.convert", kwargs={"job_id": "tls"}, queue="cpu")  # kombu, over TLS
        app.backend.store_result("tls-task", {"ok": 1}, "SUCCESS")  # Celery's SentinelBackend, over TLS
        queued, stored = client.llen("cpu"), app.backend.get_task_meta("tls-task")["status"]
        without_tls = url.split("&ssl=true")[0]
        with pytest.raises(redis.ConnectionError):  # the same sentinels without ssl=true: nothing answers
            redis_client(without_tls, socket_connect_timeout=2, socket_timeout=2).ping()
    finally:
        for process in processes:
            process.kill()
            process.wait(10)
    assert queued == 1 and stored == "SUCCESS"
