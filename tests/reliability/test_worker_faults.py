"""Workers that die, are stopped, run too long or are redelivered a running stage (issue 5, scenarios 1-3, 7, 8).

Faults are real: signals to real worker processes, a message put back into the real Redis queue.
The stage that misbehaves is the test-only ``fault-onnx`` converter (tests/plugins/fault.py),
which records every start of the stage in Redis so that duplicates are counted, not guessed.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from shared.repository import ModelRepository
from tests.reliability.conftest import fault_job, report, wait_for_runs

pytestmark = [pytest.mark.reliability, pytest.mark.integration]


def test_kill_9_of_a_worker_child_mid_convert_redelivers_the_stage_and_deploys_exactly_once(make_stack, tmp_path):
    stack = make_stack()
    stack.start_worker("cpu", "cpu1")
    repo = tmp_path / "repo"
    job = fault_job(tmp_path, "killed", {"action": "sleep", "seconds": 30, "times": 1}, deploy=repo.as_uri())

    job_id = stack.submit(job)
    first = wait_for_runs(stack, "killed", 1)[0]
    os.kill(first["pid"], signal.SIGKILL)  # the pool child, in the middle of its convert stage
    result = stack.wait(job_id, timeout=120)

    runs = stack.runs("killed")
    versions = ModelRepository.open(repo.as_uri()).versions("killed")
    report("1 kill -9 mid-stage", submitted=1, completed=int(result["state"] == "SUCCEEDED"),
           failed=int(result["state"] == "FAILED"), duplicated=len(stack.manifests()) - 1,
           stage_starts=len(runs), manifests=len(stack.manifests()), deployed_versions=len(versions))
    assert result["state"] == "SUCCEEDED", result.get("error")
    assert len(runs) == 2 and runs[1]["pid"] != first["pid"]
    assert len(stack.manifests()) == 1
    assert versions == [1]


def test_sigterm_mid_stage_lets_the_stage_finish_and_a_second_worker_takes_the_rest(make_stack, tmp_path):
    stack = make_stack()
    first = stack.start_worker("cpu", "cpu1")
    repo = tmp_path / "repo"
    slow = fault_job(tmp_path, "slow", {"action": "sleep", "seconds": 4}, seed=1, deploy=repo.as_uri())
    queued = fault_job(tmp_path, "queued", seed=2, deploy=repo.as_uri())

    slow_id = stack.submit(slow)
    wait_for_runs(stack, "slow", 1)
    queued_id = stack.submit(queued)
    os.kill(first.process.pid, signal.SIGTERM)  # warm shutdown of the worker's main process
    stack.start_worker("cpu", "cpu2")
    results = stack.wait_all([slow_id, queued_id], timeout=120)
    first.process.wait(60)

    slow_job, queued_job = results[slow_id], results[queued_id]
    starts = len(stack.runs("slow")) + len(stack.runs("queued"))
    report("2 SIGTERM mid-stage", submitted=2, completed=sum(r["state"] == "SUCCEEDED" for r in results.values()),
           failed=sum(r["state"] == "FAILED" for r in results.values()), duplicated=starts - 2,
           stage_starts=starts, first_worker_exit=first.process.returncode)
    assert [slow_job["state"], queued_job["state"]] == ["SUCCEEDED", "SUCCEEDED"], \
        [slow_job.get("error"), queued_job.get("error")]
    assert slow_job["stages"]["convert"]["worker"].startswith("cpu1@")  # finished during warm shutdown
    assert slow_job["stages"]["deploy"]["worker"].startswith("cpu2@")
    assert queued_job["stages"]["convert"]["worker"].startswith("cpu2@")
    assert starts == 2
    assert first.process.returncode == 0


def restore_unacked(client) -> int:
    """Put every unacknowledged message back on its queue, as kombu does when the visibility timeout
    expires (kombu.transport.redis QoS.restore_by_tag): the message is delivered a second time."""
    restored = 0
    for tag, raw in client.hgetall("unacked").items():
        message, _exchange, routing_key = json.loads(raw)
        message["headers"]["redelivered"] = True
        message["properties"]["delivery_info"]["redelivered"] = True
        pipe = client.pipeline(transaction=True)
        pipe.zrem("unacked_index", tag).hdel("unacked", tag).rpush(routing_key, json.dumps(message))
        pipe.execute()
        restored += 1
    return restored


def test_a_stage_redelivered_while_it_runs_waits_on_its_lease_and_computes_once(make_stack, tmp_path):
    stack = make_stack()  # lease TTL 5 s: an 8 s stage lives on lease renewals
    stack.start_worker("cpu", "cpu1")
    stack.start_worker("cpu", "cpu2")
    repo = tmp_path / "repo"
    job = fault_job(tmp_path, "long", {"action": "sleep", "seconds": 8}, deploy=repo.as_uri())

    job_id = stack.submit(job)
    wait_for_runs(stack, "long", 1)
    client = stack.redis.client()
    restored = restore_unacked(client)
    result = stack.wait(job_id, timeout=120)
    time.sleep(1)  # let the second copy's deploy finish too

    task_id = json.loads(client.hget(f"modelyard:job:{job_id}", "result_id") or "null")
    deliveries = {k.decode(): int(client.get(k)) for k in client.scan_iter("modelyard:deliveries:*")}
    starts = len(stack.runs("long"))
    versions = ModelRepository.open(repo.as_uri()).versions("long")
    report("3 redelivered while running", submitted=1, completed=int(result["state"] == "SUCCEEDED"),
           failed=int(result["state"] == "FAILED"), duplicated=starts - 1, messages_restored=restored,
           convert_deliveries=max(deliveries.values(), default=0), stage_starts=starts,
           manifests=len(stack.manifests()), deploy_tasks_run=stack.log_text().count("modelyard.deploy[") // 2,
           deployed_versions=len(versions))
    assert restored == 1 and task_id
    assert result["state"] == "SUCCEEDED", result.get("error")
    assert max(deliveries.values()) == 2  # the convert message really was delivered twice
    assert starts == 1
    assert len(stack.manifests()) == 1
    assert versions == [1]


@pytest.mark.parametrize("action", ["kill", "abort", "memory"])
def test_a_stage_whose_process_dies_every_time_fails_within_max_retries_and_the_worker_serves_on(
    make_stack, tmp_path, action
):
    stack = make_stack(env={"MODELYARD_MAX_RETRIES": "2"})
    worker = stack.start_worker("cpu", "cpu1")
    crashing = fault_job(tmp_path, f"crash-{action}", {"action": action}, seed=1)
    healthy = fault_job(tmp_path, "healthy", seed=2)

    started = time.monotonic()
    crashed = stack.wait(stack.submit(crashing), timeout=180)
    seconds = time.monotonic() - started
    served = stack.wait(stack.submit(healthy), timeout=60)

    starts = len(stack.runs(f"crash-{action}"))
    report(f"7 process dies every time ({action})", submitted=2,
           completed=int(served["state"] == "SUCCEEDED") + int(crashed["state"] == "SUCCEEDED"),
           failed=int(crashed["state"] == "FAILED"), duplicated=0, stage_starts=starts, max_retries=2,
           seconds_to_failed=round(seconds, 1))
    assert crashed["state"] == "FAILED"
    assert starts == (1 if action == "memory" else 3)  # the first run and max_retries redeliveries
    assert ("died 3 times" if action != "memory" else "ran out of memory") in crashed["error"], crashed["error"]
    assert served["state"] == "SUCCEEDED", served.get("error")
    assert worker.process.poll() is None


HARD_LIMITS = {"MODELYARD_STAGE_TIME_LIMIT_S": "10", "MODELYARD_STAGE_SOFT_TIME_LIMIT_S": "5",
               "MODELYARD_VISIBILITY_TIMEOUT_S": "30"}


def test_a_stage_past_its_hard_time_limit_fails_naming_the_limit_and_a_new_process_serves_on(make_stack, tmp_path):
    stack = make_stack(env=HARD_LIMITS)
    worker = stack.start_worker("cpu", "cpu1")
    stuck = fault_job(tmp_path, "stuck", {"action": "hang", "seconds": 120}, seed=1)
    healthy = fault_job(tmp_path, "healthy", seed=2)

    failed = stack.wait(stack.submit(stuck), timeout=90)
    served = stack.wait(stack.submit(healthy), timeout=60)

    stuck_pid, healthy_pid = stack.runs("stuck")[0]["pid"], stack.runs("healthy")[0]["pid"]
    report("8 hard time limit", submitted=2, completed=int(served["state"] == "SUCCEEDED"),
           failed=int(failed["state"] == "FAILED"), duplicated=len(stack.runs("stuck")) - 1, limit_s=10,
           child_replaced=int(stuck_pid != healthy_pid))
    assert failed["state"] == "FAILED"
    assert "hard time limit of 10 s" in failed["error"], failed["error"]
    assert failed["stages"]["convert"]["state"] == "failed"
    assert served["state"] == "SUCCEEDED", served.get("error")
    assert stuck_pid != healthy_pid and worker.process.poll() is None
    assert len(stack.runs("stuck")) == 1


def test_a_stage_past_its_soft_time_limit_fails_naming_the_limit(make_stack, tmp_path):
    stack = make_stack(env=HARD_LIMITS)
    stack.start_worker("cpu", "cpu1")
    slow = fault_job(tmp_path, "slow", {"action": "sleep", "seconds": 60})

    failed = stack.wait(stack.submit(slow), timeout=60)

    report("8b soft time limit", submitted=1, completed=0, failed=int(failed["state"] == "FAILED"),
           duplicated=len(stack.runs("slow")) - 1, soft_limit_s=5)
    assert failed["state"] == "FAILED"
    assert "time limit of 5 s" in failed["error"], failed["error"]
