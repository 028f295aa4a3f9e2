"""A burst of 500 jobs on two workers, and a job cancelled while it runs (issue 5, scenarios 9 and 10)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from shared.repository import ModelRepository
from tests.reliability.conftest import fault_job, report
from tests.services import ROOT

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

BURST = 500


def test_a_burst_of_500_jobs_on_two_workers_completes_every_job_exactly_once(make_stack, tmp_path):
    stack = make_stack()
    stack.start_worker("cpu", "cpu1")
    stack.start_worker("cpu", "cpu2")
    names = [f"burst{i:03d}" for i in range(BURST)]
    jobs = [fault_job(tmp_path, name, seed=i) for i, name in enumerate(names)]  # distinct models: no cache hits

    started = time.monotonic()
    job_ids = [stack.submit(job) for job in jobs]
    submitted_s = time.monotonic() - started
    results = stack.wait_all(job_ids, timeout=600)
    seconds = time.monotonic() - started

    client = stack.redis.client()
    starts = {name: int(client.llen(f"modelyard:test:fault-runs:{name}")) for name in names}
    completed = sum(r["state"] == "SUCCEEDED" for r in results.values())
    by_worker: dict[str, int] = {}
    for result in results.values():
        worker = result.get("stages", {}).get("convert", {}).get("worker", "none").split("@")[0]
        by_worker[worker] = by_worker.get(worker, 0) + 1
    report("9 burst of 500 jobs", submitted=BURST, completed=completed,
           failed=sum(r["state"] == "FAILED" for r in results.values()),
           duplicated=sum(n - 1 for n in starts.values() if n > 1), lost=sum(n == 0 for n in starts.values()),
           submit_s=round(submitted_s, 1), total_s=round(seconds, 1), jobs_per_s=round(BURST / seconds, 1),
           per_worker="/".join(f"{k}:{v}" for k, v in sorted(by_worker.items())),
           manifests=len(stack.manifests()))
    assert completed == BURST, {j: r.get("error") for j, r in results.items() if r["state"] != "SUCCEEDED"}
    assert set(starts.values()) == {1}  # none duplicated, none lost
    assert len(stack.manifests()) == BURST
    assert stack.queue_lengths() == {"cpu": 0, "gpu": 0}


def test_cancelling_a_running_job_marks_it_cancelled_and_deploys_nothing(make_stack, tmp_path):
    stack = make_stack()
    stack.start_worker("cpu", "cpu1")
    repo = tmp_path / "repo"
    job = fault_job(tmp_path, "cancelled", {"action": "sleep", "seconds": 4}, deploy=repo.as_uri())

    job_id = stack.submit(job)
    deadline = time.monotonic() + 60
    while not stack.runs("cancelled") and time.monotonic() < deadline:
        time.sleep(0.05)
    cli = subprocess.run([sys.executable, "-m", "producer", "cancel", job_id], cwd=ROOT, env=stack.env,
                         check=False, capture_output=True, text=True, timeout=60)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        record = stack.jobs.get(job_id)
        if record["stages"].get("deploy", {}).get("state") == "cancelled":
            break
        time.sleep(0.2)

    versions = ModelRepository.open(repo.as_uri()).versions("cancelled") if repo.exists() else []
    report("10 cancel a running job", submitted=1, completed=0, failed=0, duplicated=len(stack.runs("cancelled")) - 1,
           state=record["state"], deploy_stage=record["stages"].get("deploy", {}).get("state"),
           deployed_versions=len(versions))
    assert cli.returncode == 0 and "cancelled" in cli.stdout
    assert record["state"] == "CANCELLED"
    assert record["stages"]["deploy"]["state"] == "cancelled"  # the stage after the running one never ran
    assert versions == []
