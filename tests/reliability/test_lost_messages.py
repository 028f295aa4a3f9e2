"""A stage message the broker lost is sent again (worker.redrive); one that merely waits is left alone.

The loss is made by hand: the job is submitted while no worker runs, and its convert message is
deleted from the queue, as kombu drops a message whose BRPOP reply reaches a connection it is
replacing (tests/reliability/test_chaos.py shows that happening after a partition heals).
"""

from __future__ import annotations

import time

import pytest

from shared.queues import queue_depth, queue_keys
from shared.repository import ModelRepository
from tests.reliability.conftest import fault_job, report

pytestmark = [pytest.mark.reliability, pytest.mark.integration]
AFTER_S = 3  # MODELYARD_REDRIVE_AFTER_S of these workers


def test_a_job_whose_stage_message_was_lost_is_sent_again_and_deploys_once(make_stack, tmp_path):
    stack = make_stack()
    repo = tmp_path / "repo"
    job_id = stack.submit(fault_job(tmp_path, "lost", deploy=repo.as_uri()))
    client = stack.redis.client()
    assert sum(client.delete(key) for key in queue_keys("cpu")) == 1  # the broker "loses" the convert message
    lost = time.time()
    stack.start_worker("cpu", "cpu1", env={"MODELYARD_REDRIVE_AFTER_S": str(AFTER_S)})

    done = stack.wait(job_id, timeout=120)
    report("lost stage message", submitted=1, completed=int(done["state"] == "SUCCEEDED"),
           failed=int(done["state"] == "FAILED"), duplicated=len(stack.runs("lost")) - 1,
           redrives=done.get("redrives"), recovered_s=round(done["finished"] - lost, 1))
    assert done["state"] == "SUCCEEDED", done.get("error")
    assert done["redrives"] == 1
    assert len(stack.runs("lost")) == 1
    assert ModelRepository.open(repo.as_uri()).versions("lost") == [1]


def test_a_job_waiting_in_a_queue_no_worker_consumes_is_not_sent_again(make_stack, tmp_path):
    stack = make_stack()
    stack.start_worker("cpu", "cpu1", env={"MODELYARD_REDRIVE_AFTER_S": "1"})
    job_id = stack.submit(fault_job(tmp_path, "waiting", extra="pools: {convert: gpu}\n"))  # no gpu worker
    time.sleep(6)  # past MODELYARD_REDRIVE_AFTER_S, several scans (every second)

    record = stack.jobs.get(job_id)
    assert record["state"] == "QUEUED" and "redrives" not in record
    assert queue_depth(stack.redis.client(), "gpu") == 1
