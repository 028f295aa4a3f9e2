"""Operator commands (queues, workers, jobs) against a private Redis; no worker processes."""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

import producer.cli.operations  # noqa: F401  registers the commands (producer.cli imports it too)
from producer import api, operations
from producer.cli import app
from shared import queues
from shared.broker import redis_client
from shared.celery_app import make_celery
from shared.jobs import FAILED, INDEX, PREFIX, RUNNING, SUCCEEDED, JobStore
from shared.redis_server import free_port
from shared.settings import Settings, get_settings

DB = 7  # a database of the session's Redis that only this module uses


@pytest.fixture
def url(redis_server, monkeypatch, tmp_path):
    url = redis_server.url.rsplit("/", 1)[0] + f"/{DB}"
    monkeypatch.setenv("MODELYARD_BROKER_URL", url)
    monkeypatch.setenv("MODELYARD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MODELYARD_ARTIFACT_STORE", (tmp_path / "artifacts").as_uri())
    get_settings.cache_clear()
    redis_client(url).flushdb()
    yield url
    redis_client(url).flushdb()
    get_settings.cache_clear()


@pytest.fixture
def client(url):
    return redis_client(url)


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def as_json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


# -- queues -----------------------------------------------------------------------------------
def test_fake_messages_in_the_cpu_list_and_its_priority_lists_are_counted(client):
    client.lpush("cpu", *[json.dumps({"body": i}) for i in range(3)])
    client.lpush("cpu\x06\x169", "urgent", "urgent")
    client.lpush("gpu\x06\x163", "x")
    assert queues.queue_depth(client, "cpu") == 5
    assert queues.queue_depth(client, "gpu") == 1
    assert queues.queue_depth(client, "other") == 0


def test_queue_keys_are_the_lists_kombu_pushes_to(url, client):
    """Publish through Celery with every priority: each message lands in a list we count."""
    celery_app = make_celery(Settings(), broker_url=url)
    for priority in range(10):
        celery_app.send_task("modelyard.convert", kwargs={"job_id": f"j{priority}", "model": "m"},
                             queue="cpu", priority=priority)
    keys = set(queues.queue_keys("cpu"))
    found = {k.decode() for k in client.keys("cpu*")}
    assert found and found <= keys
    assert queues.queue_depth(client, "cpu") == 10
    with celery_app.connection_for_read() as conn:
        assert conn.default_channel._size("cpu") == 10  # kombu's own count agrees


def test_a_global_key_prefix_and_custom_steps_are_followed():
    keys = queues.queue_keys("gpu", {"global_keyprefix": "my:", "priority_steps": [0, 5], "sep": ":"})
    assert keys == ["my:gpu", "my:gpu:5"]


def test_unacked_messages_are_counted_per_queue(client):
    for tag, queue in [("a", "cpu"), ("b", "cpu"), ("c", "gpu")]:
        client.hset("unacked", tag, json.dumps([{"body": "..."}, queue, queue]))
    client.hset("unacked", "junk", "not json")
    assert queues.unacked_counts(client) == {"cpu": 2, "gpu": 1}


def test_queues_json_with_no_worker_online(client):
    client.lpush("cpu", "m1", "m2")
    client.hset("unacked", "t", json.dumps([{}, "gpu", "gpu"]))
    rows = as_json(run("queues", "--json", "--timeout", "0.2"))["queues"]
    assert rows == [
        {"queue": "cpu", "depth": 2, "unacked": 0, "consumers": 0, "workers": []},
        {"queue": "gpu", "depth": 0, "unacked": 1, "consumers": 0, "workers": []},
    ]
    table = run("queues", "--timeout", "0.2")
    assert table.exit_code == 0 and "cpu" in table.output and "gpu" in table.output


def test_class_queues_are_listed_when_consumed_or_holding_messages(client):
    """A job whose optimize.target no online worker serves shows as a class queue with messages and no consumer."""
    client.lpush("cpu.cpu-avx512-vnni\x06\x163", "select")
    client.set("cpu.not-a-list", "x")
    active = {"cpu@a": [{"name": "cpu"}, {"name": "cpu.cpu-avx2"}]}
    rows = operations.queue_report(client, active_queues=active)
    assert [row["queue"] for row in rows] == ["cpu", "gpu", "cpu.cpu-avx2", "cpu.cpu-avx512-vnni"]
    assert rows[2] == {"queue": "cpu.cpu-avx2", "depth": 0, "unacked": 0, "consumers": 1, "workers": ["cpu@a"]}
    assert rows[3] == {"queue": "cpu.cpu-avx512-vnni", "depth": 1, "unacked": 0, "consumers": 0, "workers": []}


def test_consumers_come_from_active_queues():
    replies = {"cpu@b": [{"name": "cpu"}], "gpu@a": [{"name": "gpu"}], "cpu@a": [{"name": "cpu"}]}
    assert operations.consumers(replies) == {"cpu": ["cpu@a", "cpu@b"], "gpu": ["gpu@a"]}


def test_queues_with_redis_down_exits_3(monkeypatch, url):
    monkeypatch.setenv("MODELYARD_BROKER_URL", f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    monkeypatch.setattr(api.time, "sleep", lambda s: None)
    get_settings.cache_clear()
    result = run("queues")
    assert result.exit_code == 3 and "cannot reach Redis" in result.output and "hunter2" not in result.output


# -- workers ----------------------------------------------------------------------------------
def test_workers_with_none_online_prints_an_empty_table(url):
    started = time.monotonic()
    result = run("workers", "--timeout", "0.3")
    assert result.exit_code == 0, result.output
    assert "workers online: 0" in result.output
    assert as_json(run("workers", "--json", "--timeout", "0.3")) == {"workers": []}
    assert time.monotonic() - started < 10


class FakeInspect:
    def __init__(self, calls, destination=None, **kwargs):
        self.calls, self.destination = calls, destination
        calls.append(("inspect", destination, kwargs.get("limit")))

    def active_queues(self):
        return {"gpu@h": [{"name": "gpu"}, {"name": "gpu.gpu-h100-80gb-hbm3"}], "cpu@h": [{"name": "cpu"}]}

    def active(self):
        return {
            "gpu@h": [{"id": "t1", "name": "modelyard.optimize", "time_start": 100.0, "worker_pid": 42,
                       "kwargs": {"job_id": "j1", "model": "minilm", "variant": "fp16"},
                       "delivery_info": {"routing_key": "gpu"}}],
            "cpu@h": [],
        }

    def stats(self):
        return {"gpu@h": {"pid": 7, "uptime": 5, "total": {"modelyard.convert": 3, "modelyard.optimize": 4},
                          "pool": {"implementation": "celery.concurrency.prefork:TaskPool", "max-concurrency": 1}},
                "cpu@h": {"total": {}, "pool": {"implementation": "celery.concurrency.prefork:TaskPool",
                                                "max-concurrency": 2}}}


class FakeApp:
    def __init__(self):
        self.calls = []
        app = self

        class Control:
            def inspect(self, **kwargs):
                return FakeInspect(app.calls, **kwargs)

        self.control = Control()


def test_workers_report_reads_job_stage_and_variant_from_the_task_kwargs():
    fake = FakeApp()
    rows = operations.workers_report(fake, timeout=0.5)
    assert [r["name"] for r in rows] == ["cpu@h", "gpu@h"]
    gpu = rows[1]
    assert gpu["queues"] == ["gpu", "gpu.gpu-h100-80gb-hbm3"] and gpu["pool"] == "prefork" and gpu["concurrency"] == 1
    assert gpu["hardware_class"] == "gpu-h100-80gb-hbm3" and rows[0]["hardware_class"] is None
    assert gpu["processed"] == 7
    assert gpu["active"] == [{"task_id": "t1", "task": "modelyard.optimize", "stage": "optimize", "job_id": "j1",
                              "model": "minilm", "variant": "fp16", "queue": "gpu", "started": 100.0, "pid": 42}]
    assert rows[0]["active"] == [] and rows[0]["processed"] == 0
    # the follow-up broadcasts address the workers that answered, so they do not wait the full timeout
    assert fake.calls[1] == ("inspect", ["cpu@h", "gpu@h"], 2)


# -- jobs -------------------------------------------------------------------------------------
def make_jobs(url) -> JobStore:
    store = JobStore.from_url(url)
    specs = [("a1", "alpha", SUCCEEDED, ""), ("b1", "beta", FAILED, "optimize:int8: gate failed\nsecond line"),
             ("a2", "alpha", RUNNING, ""), ("a3", "alpha", FAILED, "x" * 500)]
    for job_id, model, state, error in specs:
        store.create(job_id, {"model": model, "spec": {"model": {"name": model}}})
        if state != "QUEUED":
            store.set_state(job_id, state, error)
        time.sleep(0.002)  # distinct creation times: newest first is a3, a2, b1, a1
    return store


def test_jobs_lists_newest_first_with_duration_and_error_summary(url):
    make_jobs(url)
    rows = as_json(run("jobs", "--json"))["jobs"]
    assert [r["id"] for r in rows] == ["a3", "a2", "b1", "a1"]
    by_id = {r["id"]: r for r in rows}
    assert by_id["b1"]["error_summary"] == "optimize:int8: gate failed"
    assert len(by_id["a3"]["error_summary"]) == operations.ERROR_SUMMARY_CHARS
    assert by_id["a1"]["duration_s"] is not None and by_id["a1"]["duration_s"] >= 0
    assert by_id["a2"]["duration_s"] is not None  # running: time so far
    assert by_id["a1"]["model"] == "alpha" and by_id["a1"]["state"] == "SUCCEEDED"


def test_jobs_filters_by_state_model_and_limit(url):
    make_jobs(url)
    assert [r["id"] for r in as_json(run("jobs", "--json", "--state", "failed"))["jobs"]] == ["a3", "b1"]
    assert [r["id"] for r in as_json(run("jobs", "--json", "--model", "alpha"))["jobs"]] == ["a3", "a2", "a1"]
    assert [r["id"] for r in as_json(run("jobs", "--json", "--model", "alpha", "--state", "FAILED",
                                         "--limit", "5"))["jobs"]] == ["a3"]
    assert [r["id"] for r in as_json(run("jobs", "--json", "--limit", "2"))["jobs"]] == ["a3", "a2"]
    assert as_json(run("jobs", "--json", "--model", "nobody"))["jobs"] == []


def test_jobs_filtering_pages_through_a_long_index(url):
    store = make_jobs(url)
    for i in range(30):
        store.create(f"z{i}", {"model": "zeta"})
    rows = operations.jobs_report(store, model="beta", limit=5, page=4)
    assert [r["id"] for r in rows] == ["b1"]


def test_jobs_skips_index_entries_whose_record_is_gone(url, client):
    make_jobs(url)
    client.zadd(INDEX, {"ghost": time.time() + 10})
    client.delete(PREFIX + "a2")
    ids = [r["id"] for r in as_json(run("jobs", "--json"))["jobs"]]
    assert "ghost" not in ids and "a2" not in ids and ids[0] == "a3"


def test_jobs_table(url):
    make_jobs(url)
    result = run("jobs", "--model", "beta")
    assert result.exit_code == 0, result.output
    assert "b1" in result.output and "FAILED" in result.output and "gate failed" in result.output
    assert "second line" not in result.output


def test_a_bad_state_exits_2(url):
    result = run("jobs", "--state", "sleeping")
    assert result.exit_code == 2 and "--state must be one of" in result.output
