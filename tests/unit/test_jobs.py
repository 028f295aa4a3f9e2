"""The job record's stage bookkeeping against a private Redis: few round trips, same guarantees."""

from __future__ import annotations

import pytest

from shared.jobs import CANCELLED, FAILED, RUNNING, JobStore

DB = 9  # a database of the session's Redis that only this module uses


@pytest.fixture
def jobs(redis_server):
    store = JobStore.from_url(redis_server.url.rsplit("/", 1)[0] + f"/{DB}")
    store.redis.flushdb()
    yield store
    store.redis.flushdb()


def test_begin_stage_sets_the_job_running_and_writes_the_stage_record(jobs):
    jobs.create("j1", {"spec": {}})

    start = jobs.begin_stage("j1", "convert", "deliveries:t1:0", 3, state="running", attempt=1)

    assert start.cancelled is False and start.died == 0
    job = jobs.get("j1")
    assert job["state"] == RUNNING
    assert job["stages"]["convert"] == {"state": "running", "attempt": 1}


def test_begin_stage_on_a_cancelled_job_reports_it_and_writes_nothing(jobs):
    jobs.create("j1", {"spec": {}})
    jobs.set_state("j1", CANCELLED)

    start = jobs.begin_stage("j1", "convert", "deliveries:t1:0", 3, state="running")

    assert start.cancelled is True
    assert jobs.get("j1")["stages"] == {} and jobs.state("j1") == CANCELLED
    assert jobs.redis.get("deliveries:t1:0") is None


def test_begin_stage_counts_redeliveries_and_stops_past_the_limit(jobs):
    jobs.create("j1", {"spec": {}})
    starts = [jobs.begin_stage("j1", "convert", "deliveries:t1:0", 1, state="running") for _ in range(3)]

    assert [s.died for s in starts] == [0, 1, 2]
    assert jobs.redis.ttl("deliveries:t1:0") > 0


def test_begin_stage_keeps_a_final_job_state(jobs):
    jobs.create("j1", {"spec": {}})
    jobs.set_state("j1", FAILED, "boom")

    jobs.begin_stage("j1", "convert", "deliveries:t1:0", 3, state="running")

    assert jobs.state("j1") == FAILED


def test_begin_stage_merges_into_an_existing_stage_record(jobs):
    jobs.create("j1", {"spec": {}})
    jobs.update_stage("j1", "convert", state="failed", message="earlier attempt")

    jobs.begin_stage("j1", "convert", "deliveries:t1:1", 3, state="running", attempt=2)

    assert jobs.get("j1")["stages"]["convert"] == {"state": "running", "message": "earlier attempt", "attempt": 2}


def test_update_stage_merges_what_another_process_wrote_since(jobs, redis_server):
    jobs.create("j1", {"spec": {}})
    jobs.update_stage("j1", "select", state="running")
    other = JobStore.from_url(redis_server.url.rsplit("/", 1)[0] + f"/{DB}")
    other.update_stage("j1", "select", table=[{"variant": "fp32"}])

    jobs.update_stage("j1", "select", state="done")

    assert jobs.get("j1")["stages"]["select"] == {"state": "done", "table": [{"variant": "fp32"}]}
