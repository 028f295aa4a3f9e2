"""Redis and object storage going away under running jobs (issue 5, scenarios 4-6).

Redis is stopped and started again on the same port with its AOF file; the GCS emulator is stopped
and restarted on the same port with its data folder. Nothing is mocked.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest

from shared.redis_server import free_port
from tests.reliability.conftest import fault_job, report
from tests.services import ROOT
from tests.storage_fixtures import _emulator_executable, _wait_until_answering

pytestmark = [pytest.mark.reliability, pytest.mark.integration]


def test_redis_restarted_under_50_jobs_loses_none_and_workers_resume_without_restart(make_stack, tmp_path):
    stack = make_stack()
    workers = [stack.start_worker("cpu", "cpu1"), stack.start_worker("cpu", "cpu2")]
    names = [f"load{i:02d}" for i in range(50)]
    job_ids = [stack.submit(fault_job(tmp_path, name, {"action": "sleep", "seconds": 0.3}, seed=i))
               for i, name in enumerate(names)]
    store = stack.jobs
    deadline = time.monotonic() + 60
    while sum(store.state(j) == "SUCCEEDED" for j in job_ids) < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    queued_before = stack.queue_lengths()["cpu"]

    back = stack.restart_redis(down_s=2.0)  # SIGTERM (AOF flushed), 2 s down, same port and password
    back_wall = time.time()
    results = stack.wait_all(job_ids, timeout=240)

    starts = {name: len(stack.runs(name)) for name in names}
    resumed_after = min((r["started"] for name in names for r in stack.runs(name) if r["started"] > back_wall),
                        default=None)
    completed = sum(r["state"] == "SUCCEEDED" for r in results.values())
    unacked = stack.redis.client().hlen("unacked")
    report("4 Redis restart (AOF)", submitted=50, completed=completed,
           failed=sum(r["state"] == "FAILED" for r in results.values()),
           duplicated=sum(n - 1 for n in starts.values() if n > 1), queued_at_restart=queued_before,
           first_stage_after_restart_s=None if resumed_after is None else round(resumed_after - back_wall, 2),
           all_done_after_restart_s=round(time.monotonic() - back, 1), unacked_left=unacked)
    assert queued_before > 0  # the restart really hit queued jobs
    assert completed == 50, {j: (r["state"], r.get("error")) for j, r in results.items() if r["state"] != "SUCCEEDED"}
    assert resumed_after is not None and resumed_after - back_wall < 60
    assert all(w.process.poll() is None for w in workers)
    assert all(n >= 1 for n in starts.values())


def test_submit_with_redis_down_retries_then_exits_3_and_records_nothing(make_stack, tmp_path):
    stack = make_stack()
    job = fault_job(tmp_path, "offline")
    stack.redis.stop()

    started = time.monotonic()
    cli = subprocess.run([sys.executable, "-m", "producer", "submit", str(job)], cwd=ROOT, env=stack.env,
                         check=False, capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - started
    stack.restart_redis()
    client = stack.redis.client()
    recorded = client.zcard("modelyard:jobs") + sum(1 for _ in client.scan_iter("modelyard:job:*"))
    queued = sum(stack.queue_lengths().values())
    blobs = list((stack.folder / "artifacts").rglob("blobs/*/*/*"))

    report("5 Redis down at submit", submitted=1, completed=0, failed=int(cli.returncode != 0), duplicated=0,
           exit_code=cli.returncode, cli_seconds=round(seconds, 1), jobs_recorded=recorded, queued=queued,
           blobs_uploaded=len(blobs))
    assert cli.returncode == 3
    assert "cannot reach Redis" in cli.stderr + cli.stdout
    assert stack.redis.password not in cli.stderr + cli.stdout
    assert "Traceback" not in cli.stderr
    assert recorded == 0 and queued == 0 and blobs == []


@pytest.fixture
def stoppable_emulator(tmp_path):
    """A GCS emulator on a fixed port that keeps its objects on disk, so it can be stopped and restarted."""
    executable = _emulator_executable()
    if executable is None:
        pytest.skip("gcp-storage-emulator is not installed")
    port, data = free_port(), tmp_path / "gcs-data"
    data.mkdir()
    log = tmp_path / "gcs.log"
    host = f"http://127.0.0.1:{port}"
    current: list[subprocess.Popen] = []

    def start() -> None:
        with open(log, "ab") as out:
            process = subprocess.Popen([executable, "start", "--host", "127.0.0.1", "--port", str(port)],
                                       env={**os.environ, "STORAGE_BASE": str(data)}, stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        current[:] = [process]
        _wait_until_answering(f"{host}/storage/v1/b?project=modelyard", process, log)

    def stop() -> None:
        for process in current:
            process.terminate()
            process.wait(10)

    start()
    yield host, start, stop
    stop()


def test_object_storage_down_for_seconds_mid_stage_is_retried_and_the_job_completes(
    make_stack, tmp_path, stoppable_emulator
):
    host, start_emulator, stop_emulator = stoppable_emulator
    bucket = f"gs://modelyard-rel-{uuid.uuid4().hex[:12]}/artifacts"
    stack = make_stack(artifact_store=bucket, env={"STORAGE_EMULATOR_HOST": host, "MODELYARD_GCS_CREATE_BUCKET": "1"})
    stack.start_worker("cpu", "cpu1", env={"STORAGE_EMULATOR_HOST": host})
    repo = tmp_path / "repo"
    job = fault_job(tmp_path, "outage", {"action": "sleep", "seconds": 2}, deploy=repo.as_uri())

    with pytest.MonkeyPatch.context() as env:
        env.setenv("STORAGE_EMULATOR_HOST", host)
        env.setenv("MODELYARD_GCS_CREATE_BUCKET", "1")
        job_id = stack.submit(job)
    deadline = time.monotonic() + 60
    while not stack.runs("outage") and time.monotonic() < deadline:
        time.sleep(0.05)
    stop_emulator()  # the stage finishes computing and uploads while storage is away
    time.sleep(5)
    start_emulator()
    result = stack.wait(job_id, timeout=180)

    convert = result["stages"].get("convert", {})
    report("6 object storage outage", submitted=1, completed=int(result["state"] == "SUCCEEDED"),
           failed=int(result["state"] == "FAILED"), duplicated=len(stack.runs("outage")) - 1, outage_s=5,
           convert_attempts=convert.get("attempt"), celery_retries_logged=stack.log_text().count(" retry: "),
           convert_stage_s=round(convert.get("finished", 0) - convert.get("started", 0), 1))
    assert result["state"] == "SUCCEEDED", result.get("error")
    assert result["stages"]["deploy"]["version"] == 1
    assert convert["finished"] - convert["started"] > 4  # its upload really waited out the outage
