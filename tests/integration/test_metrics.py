"""Worker metrics: a real prefork Celery worker process serves /metrics summed over its children.

The worker runs a small probe app (written to a temporary folder) whose task records a stage
through ``worker.metrics`` the way ``worker.tasks`` does, so the test stays cheap: no model work.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from shared.broker import redis_client
from shared.celery_app import make_celery
from shared.redis_server import free_port
from shared.settings import Settings
from tests.services import ROOT
from worker import metrics

pytestmark = pytest.mark.integration

DB = 8  # a database of the session's Redis that only this module uses

PROBE_APP = '''
import os, time
from shared.celery_app import make_celery
from shared.settings import Settings
from worker import metrics

app = make_celery(Settings())


@app.task(name="probe.stage", ignore_result=False)
def stage(variant="fp16", hit=False, seconds=0.2, nbytes=0):
    with metrics.track_stage(f"optimize:{variant}", "cpu"):
        metrics.cache_lookup(f"optimize:{variant}", hit)
        time.sleep(seconds)
    metrics.bytes_moved("uploaded", nbytes)
    return os.getpid()


@app.task(name="probe.fail", ignore_result=False)
def fail():
    with metrics.track_stage("convert", "cpu"):
        raise RuntimeError("boom")
'''


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def probe_worker(redis_server, service_env, tmp_path):
    url = redis_server.url.rsplit("/", 1)[0] + f"/{DB}"
    (tmp_path / "probe_app.py").write_text(PROBE_APP)
    port = free_port()
    metrics_base = tmp_path / "metrics"
    env = {**service_env, "MODELYARD_BROKER_URL": url, "MODELYARD_METRICS_PORT": str(port),
           "MODELYARD_METRICS_ADDR": "127.0.0.1", "MODELYARD_METRICS_DIR": str(metrics_base),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = tmp_path / "worker.log"
    # two children, each replaced after one task: the counts of dead children must survive
    args = [sys.executable, "-m", "celery", "-A", "probe_app", "worker", "-Q", "cpu", "-n", "probe@%h",
            "-c", "2", "--max-tasks-per-child=1", "--loglevel=INFO", "--without-gossip", "--without-mingle"]
    with open(log, "ab") as out:
        process = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                scrape(port)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker serves no metrics:\n{log.read_text()[-3000:]}") from None
                time.sleep(0.3)
        yield {"url": url, "port": port, "process": process, "log": log, "metrics_base": metrics_base}
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        redis_client(url).flushdb()


def test_stage_durations_from_every_prefork_child_appear_on_metrics(probe_worker):
    port = probe_worker["port"]
    celery_app = make_celery(Settings(), broker_url=probe_worker["url"])
    results = [celery_app.send_task("probe.stage", kwargs={"hit": i == 2, "nbytes": 1000}, queue="cpu")
               for i in range(3)]
    pids = [r.get(timeout=60) for r in results]
    assert len(set(pids)) == 3  # three child processes (max-tasks-per-child=1): two of them already gone
    with pytest.raises(Exception, match="boom"):
        celery_app.send_task("probe.fail", queue="cpu").get(timeout=60)

    samples = scrape(port)
    labels = {"stage": "optimize", "variant": "fp16", "pool": "cpu", "outcome": "done"}
    assert sample(samples, "modelyard_stage_duration_seconds_count", cached="false", **labels) == 2
    assert sample(samples, "modelyard_stage_duration_seconds_count", cached="true", **labels) == 1
    assert sample(samples, "modelyard_stage_duration_seconds_sum", cached="false", **labels) >= 0.4
    assert sample(samples, "modelyard_stage_duration_seconds_bucket", cached="false", le="0.1", **labels) == 0
    assert sample(samples, "modelyard_stage_duration_seconds_bucket", cached="false", le="+Inf", **labels) == 2
    assert sample(samples, "modelyard_stage_duration_seconds_count", stage="convert", variant="", pool="cpu",
                  cached="none", outcome="failed") == 1
    assert sample(samples, "modelyard_step_cache_lookups_total", stage="optimize", variant="fp16", result="miss") == 2
    assert sample(samples, "modelyard_step_cache_lookups_total", stage="optimize", variant="fp16", result="hit") == 1
    assert sample(samples, "modelyard_artifact_bytes_total", direction="uploaded") == 3000
    # the worker's folder holds one file per child that recorded something
    folders = list(probe_worker["metrics_base"].iterdir())
    assert len(folders) == 1 and len(list(folders[0].glob("*.db"))) >= 3


def test_queue_depth_is_read_from_redis_at_scrape_time(probe_worker):
    client = redis_client(probe_worker["url"])
    client.lpush("gpu", *[json.dumps({"n": i}) for i in range(3)])  # no gpu consumer: they stay
    client.lpush("gpu\x06\x166", "later")
    client.hset("unacked", "tag", json.dumps([{}, "gpu", "gpu"]))
    try:
        samples = scrape(probe_worker["port"])
        assert sample(samples, "modelyard_queue_depth", queue="gpu") == 4
        assert sample(samples, "modelyard_queue_unacked", queue="gpu") == 1
        assert sample(samples, "modelyard_queue_depth", queue="cpu") == 0
        assert sample(samples, "modelyard_broker_up") == 1
    finally:
        client.delete("gpu", "gpu\x06\x166", "unacked")


def test_the_worker_removes_its_metrics_folder_on_warm_shutdown(probe_worker):
    process = probe_worker["process"]
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(30)
    assert list(probe_worker["metrics_base"].iterdir()) == []


# -- in this process (no multiprocess mode): the recording helpers ---------------------------------
def value(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_track_stage_outcomes_and_cache_label():
    base = {"stage": "deploy", "variant": "", "pool": "gpu"}
    before = value("modelyard_stage_duration_seconds_count", cached="none", outcome="cancelled", **base)

    class JobCancelled(Exception):
        pass

    with pytest.raises(JobCancelled):
        with metrics.track_stage("deploy", "gpu"):
            raise JobCancelled()
    assert value("modelyard_stage_duration_seconds_count", cached="none", outcome="cancelled", **base) == before + 1

    with metrics.track_stage("optimize:int8", "cpu") as tracked:
        metrics.cache_lookup("optimize:int8", True)
        tracked.outcome = "failed"  # a variant that returned its error
    assert value("modelyard_stage_duration_seconds_count", stage="optimize", variant="int8", pool="cpu",
                 cached="true", outcome="failed") >= 1


def test_a_stage_store_counts_real_transfers_only(tmp_path):
    from worker.context import StageContext

    class OneJob:  # the job record is all StageContext.store reads
        def get(self, job_id):
            return {"artifact_store": (tmp_path / "store").as_uri()}

    store = StageContext(settings=Settings(), jobs=OneJob(), job_id="j").store
    data = tmp_path / "blob.bin"
    data.write_bytes(b"x" * 1234)
    up, down = value("modelyard_artifact_bytes_total", direction="uploaded"), \
        value("modelyard_artifact_bytes_total", direction="downloaded")
    ref = store.put_file(data)
    store.put_file(data)  # already stored: not uploaded again
    store.get_files([ref], tmp_path / "out")
    assert value("modelyard_artifact_bytes_total", direction="uploaded") == up + 1234
    assert value("modelyard_artifact_bytes_total", direction="downloaded") == down + 1234


def test_the_port_setting(monkeypatch):
    assert metrics.configured_port({}) == 0
    assert metrics.configured_port({"MODELYARD_METRICS_PORT": "0"}) == 0
    assert metrics.configured_port({"MODELYARD_METRICS_PORT": " 9808 "}) == 9808
    with pytest.raises(ValueError, match="MODELYARD_METRICS_PORT"):
        metrics.configured_port({"MODELYARD_METRICS_PORT": "metrics"})


def test_a_taken_port_moves_to_the_next(tmp_path):
    import socket

    from prometheus_client import CollectorRegistry

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        base = taken.getsockname()[1]
        if base + 1 > 65535:
            pytest.skip("no room above the port")
        port = metrics.serve(CollectorRegistry(), base, "127.0.0.1")
        try:
            assert port > base
            assert metrics.serving_port() == port
        finally:
            metrics.stop()
        assert metrics.serving_port() is None
