"""Faults of the host and the network under real jobs (issue 20, fleet operations): ``pytest -m chaos``.

Each test builds a private stack (tests/reliability/conftest.py), injects one fault the way the
machine would really produce it, and checks that the job ends SUCCEEDED, or FAILED with a message
naming the fault; that nothing is deployed twice; and that the worker then serves the next job.
Each prints one ``RELIABILITY chaos ...`` line with what the job ended as and how long recovery
took (repeated in the terminal summary). Nothing is mocked:

* a kernel OOM kill: the worker runs in a memory cgroup (v1 or v2, root) and its stage touches
  more memory than the limit;
* a network partition that hangs: a TCP proxy between the worker and Redis stops forwarding
  without closing anything, then heals (tests/reliability/chaos.py);
* a full disk: the worker's TMPDIR is a small tmpfs that another tenant has nearly filled;
* a crash between claiming a repository version and publishing it: the repository is on gs://
  (the GCS emulator) behind the proxy, which hangs on the first upload into the claimed version;
  the worker process is then killed with SIGKILL;
* a gs:// outage during deploy: the same proxy hangs on the claim, the emulator is stopped and
  started again.

Faults that need root (cgroups, mount) skip with the reason where they are unavailable.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
import uuid

import pytest

from shared.errors import UserInputError
from shared.repository import ModelRepository
from tests.reliability.chaos import TcpProxy, Unavailable, fill, memory_cgroup, tmpfs
from tests.reliability.conftest import fault_job, report, wait_for_runs
from tests.reliability.test_infrastructure_faults import stoppable_emulator  # noqa: F401  (fixture)

pytestmark = [pytest.mark.reliability, pytest.mark.integration, pytest.mark.chaos]


def finished(job: dict) -> float:
    """When the job ended (now, for one still running: the figure is then a lower bound)."""
    return job.get("finished") or time.time()


def chaos_report(fault: str, ended: dict, served: dict, *, recovery_s: float, duplicated: int, **figures) -> None:
    """One table row for the closing note: fault | job ended as | message | recovery time."""
    message = (ended.get("error") or "").replace(" ", "_")[:160]
    report(f"chaos {fault}", submitted=2, completed=sum(r["state"] == "SUCCEEDED" for r in (ended, served)),
           failed=sum(r["state"] == "FAILED" for r in (ended, served)), duplicated=duplicated,
           ended=ended["state"], recovery_s=round(recovery_s, 1), **figures, message=message or "-")


@pytest.fixture
def proxies():
    made: list[TcpProxy] = []

    def make(port: int) -> TcpProxy:
        made.append(TcpProxy(port))
        return made[-1]

    yield make
    for proxy in made:
        proxy.close()


# -- a network partition between the worker and Redis ------------------------------------
PARTITION_S = 10


REDRIVE_AFTER_S = 20  # MODELYARD_REDRIVE_AFTER_S of the partitioned worker


def test_a_redis_partition_that_hangs_connections_is_survived_and_the_worker_serves_the_next_job(
    make_stack, tmp_path, proxies
):
    """The worker reaches Redis only through the proxy; the test (the producer) reaches it directly.

    The partition starts while the first job's convert stage runs and lasts PARTITION_S; after it
    heals, the connections that lived through it stay silent for good, so the worker recovers only
    if every Redis client in it (the consumer in the main process; the job store, the step lease and
    the chain's publisher in the pool process) gives up on a silent connection and reconnects.
    """
    stack = make_stack()
    proxy = proxies(stack.redis.port)
    proxied = stack.redis.url.replace(f":{stack.redis.port}/", f":{proxy.port}/")
    stack.start_worker("cpu", "cpu1", env={"MODELYARD_BROKER_URL": proxied,
                                           "MODELYARD_REDRIVE_AFTER_S": str(REDRIVE_AFTER_S)})
    repo = tmp_path / "repo"
    first = fault_job(tmp_path, "partitioned", {"action": "sleep", "seconds": 3}, deploy=repo.as_uri())

    first_id = stack.submit(first)
    wait_for_runs(stack, "partitioned", 1)
    proxy.hang()
    time.sleep(PARTITION_S)
    proxy.heal()
    healed = time.time()
    second_id = stack.submit(fault_job(tmp_path, "after-partition", seed=1, deploy=repo.as_uri()))
    results = stack.wait_all([first_id, second_id], timeout=150)

    ended, served = results[first_id], results[second_id]
    repository = ModelRepository.open(repo.as_uri())
    versions = {name: repository.versions(name) for name in ("partitioned", "after-partition")}
    chaos_report("2 Redis partition (hang)", ended, served, recovery_s=max(map(finished, results.values())) - healed,
                 duplicated=len(stack.runs("partitioned")) - 1,
                 partition_s=PARTITION_S, first_job_done_after_heal_s=round(finished(ended) - healed, 1),
                 next_job_redrives=served.get("redrives", 0),
                 versions=versions)
    assert ended["state"] == "SUCCEEDED", ended.get("error")
    assert versions["partitioned"] == [1]
    assert len(stack.runs("partitioned")) == 1
    # kombu 5.7 may drop a message after the partition heals (its consumer takes a BRPOP reply for a
    # closed connection's and discards it with the message): worker.redrive sends that stage again.
    assert served["state"] == "SUCCEEDED", served.get("error")
    assert versions["after-partition"] == [1]


# -- a kernel OOM kill ----------------------------------------------------------------------
MEMORY_LIMIT_MB = 512
ALLOCATE_MB = 1536


@pytest.fixture
def memory_limited():
    """(command prefix, how the limit is enforced, OOM-kill counter or None) for a worker under MEMORY_LIMIT_MB.

    A memory cgroup (v1 here, v2 elsewhere) where one is writable: the kernel kills the process
    that touches too much (SIGKILL). Else ``prlimit --as``: the address space is capped, and the
    allocation fails in Python with MemoryError instead, which the stage reports as such.
    """
    try:
        with memory_cgroup(MEMORY_LIMIT_MB) as (prefix, kind, oom_kills):
            yield prefix, kind, oom_kills
            return
    except Unavailable as exc:
        reason = str(exc)
    if shutil.which("prlimit") is None:
        pytest.skip(f"no memory cgroup ({reason}) and no prlimit")
    yield ["prlimit", f"--as={3 * MEMORY_LIMIT_MB * 2**20}", "--"], "prlimit --as", None


# memory_limited comes first: it is torn down after make_stack stopped the worker, so its cgroup is empty.
def test_a_stage_the_kernel_oom_kills_once_is_redelivered_and_the_job_succeeds(memory_limited, make_stack, tmp_path):
    prefix, kind, oom_kills = memory_limited
    stack = make_stack(env={"MODELYARD_MAX_RETRIES": "1"})
    stack.start_worker("cpu", "cpu1", command_prefix=prefix)
    repo = tmp_path / "repo"
    hungry = fault_job(tmp_path, "hungry", {"action": "allocate", "megabytes": ALLOCATE_MB, "times": 1},
                       deploy=repo.as_uri())

    ended = stack.wait(stack.submit(hungry), timeout=180)
    served = stack.wait(stack.submit(fault_job(tmp_path, "after-oom", seed=1, deploy=repo.as_uri())), timeout=120)

    runs = stack.runs("hungry")
    kills = oom_kills() if oom_kills else None
    versions = ModelRepository.open(repo.as_uri()).versions("hungry")
    chaos_report("1 kernel OOM kill (once)", ended, served, recovery_s=finished(ended) - runs[0]["started"],
                 duplicated=len(versions) - 1, limit=kind, oom_kills=kills, stage_starts=len(runs))
    if oom_kills is None:  # prlimit: Python's MemoryError, not the kernel
        assert ended["state"] == "FAILED" and "ran out of memory" in ended["error"], ended
    else:
        assert kills >= 1  # the kernel's OOM killer ended it, not a MemoryError
        assert ended["state"] == "SUCCEEDED", ended.get("error")
        assert len(runs) == 2 and runs[0]["pid"] != runs[1]["pid"]
        assert versions == [1]
    assert served["state"] == "SUCCEEDED", served.get("error")


def test_a_stage_the_kernel_oom_kills_every_time_fails_naming_memory_and_the_worker_serves_on(
    memory_limited, make_stack, tmp_path
):
    prefix, kind, oom_kills = memory_limited
    stack = make_stack(env={"MODELYARD_MAX_RETRIES": "1"})
    worker = stack.start_worker("cpu", "cpu1", command_prefix=prefix)
    hungry = fault_job(tmp_path, "always-hungry", {"action": "allocate", "megabytes": ALLOCATE_MB})

    ended = stack.wait(stack.submit(hungry), timeout=180)
    served = stack.wait(stack.submit(fault_job(tmp_path, "after-oom", seed=1)), timeout=120)

    runs = stack.runs("always-hungry")
    kills = oom_kills() if oom_kills else None
    chaos_report("1b kernel OOM kill (every time)", ended, served,
                 recovery_s=finished(served) - finished(ended), duplicated=0, limit=kind, oom_kills=kills,
                 stage_starts=len(runs))
    assert ended["state"] == "FAILED"
    assert "out of memory" in ended["error"], ended["error"]
    if oom_kills is not None:
        assert kills >= 2 and len(runs) == 2  # the first run and one redelivery, each killed by the kernel
        assert "died 2 times" in ended["error"], ended["error"]
    assert served["state"] == "SUCCEEDED", served.get("error")
    assert worker.process.poll() is None


# -- a full disk ------------------------------------------------------------------------------
SCRATCH_MB, PADDING_MB = 8, 3


def test_a_full_scratch_disk_fails_the_stage_naming_it_and_the_worker_serves_once_space_is_freed(
    make_stack, tmp_path
):
    """TMPDIR of the worker is an 8 MB tmpfs; another tenant leaves 1 MB free; the stage writes 3 MB."""
    with contextlib.ExitStack() as cleanup:
        try:
            scratch = cleanup.enter_context(tmpfs(tmp_path / "scratch", SCRATCH_MB))
        except Unavailable as exc:
            pytest.skip(str(exc))
        stack = make_stack()
        cleanup.callback(stack.stop)  # before the tmpfs is unmounted
        stack.start_worker("cpu", "cpu1", env={"TMPDIR": str(scratch)})
        repo = tmp_path / "repo"
        big = fault_job(tmp_path, "big", {"action": "write", "megabytes": PADDING_MB}, deploy=repo.as_uri())
        filler = fill(scratch, leave_mb=1)

        ended = stack.wait(stack.submit(big), timeout=120)
        left_behind = [p.name for p in scratch.glob("modelyard-*")]  # (pymp-*: the pool's own, it stays)
        filler.unlink()
        freed = time.time()
        served = stack.wait(stack.submit(big), timeout=120)

        versions = ModelRepository.open(repo.as_uri()).versions("big")
        chaos_report("3 full disk (TMPDIR)", ended, served, recovery_s=finished(served) - freed,
                     duplicated=len(versions) - 1, scratch_mb=SCRATCH_MB, left_behind=len(left_behind))
        assert ended["state"] == "FAILED"
        assert "ran out of disk space" in ended["error"] and str(scratch) in ended["error"], ended["error"]
        assert "Traceback" not in ended["error"]
        assert left_behind == []  # the failed stage's temporary folder was removed
        assert served["state"] == "SUCCEEDED", served.get("error")
        assert versions == [1]


# -- object storage (gs://, the GCS emulator) behind the proxy ------------------------------------
def gcs_stack(make_stack, proxies, emulator_host: str, monkeypatch):
    """A stack whose worker reaches the GCS emulator only through a proxy (this process, the producer
    side, reaches it directly), and a fresh gs:// repository URL."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator_host)
    monkeypatch.setenv("MODELYARD_GCS_CREATE_BUCKET", "1")
    port = int(emulator_host.rsplit(":", 1)[1])
    proxy = proxies(port)
    stack = make_stack(env={"MODELYARD_ALLOWED_REPOSITORIES": '["file://*", "gs://*"]',
                            "MODELYARD_GCS_CREATE_BUCKET": "1", "STORAGE_EMULATOR_HOST": emulator_host})
    stack.start_worker("cpu", "cpu1", env={"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{proxy.port}"})
    return stack, proxy, f"gs://chaos-{uuid.uuid4().hex[:12]}/repo"


def wait_for(event, what: str, timeout: float = 120) -> None:
    if not event.wait(timeout):
        raise AssertionError(f"{what} did not happen within {timeout} s")


def test_a_worker_killed_between_claiming_and_publishing_a_version_leaves_it_unserved_and_deploys_once(
    make_stack, tmp_path, proxies, stoppable_emulator, monkeypatch
):
    """The proxy hangs on the first upload into the claimed version 1 (after ``claim_version``, inside
    ``publish``): that is where the worker's pool process is killed with SIGKILL."""
    host, _start, _stop = stoppable_emulator
    stack, proxy, repo = gcs_stack(make_stack, proxies, host, monkeypatch)
    proxy.hang_on(b"crash/1/model.onnx")

    job_id = stack.submit(fault_job(tmp_path, "crash", deploy=repo))
    wait_for(proxy.triggered, "the upload of version 1's model")
    pid = stack.runs("crash")[0]["pid"]  # the pool process (concurrency 1) that runs the deploy now
    os.kill(pid, signal.SIGKILL)
    killed = time.time()
    proxy.sever()  # the emulator serves one request at a time: free it of the half-sent upload
    repository = ModelRepository.open(repo)  # still hung for the worker: its redelivered deploy waits
    claimed_only = (repository.versions("crash"), repository.store.exists("crash/1/.claim"))
    proxy.heal()
    ended = stack.wait(job_id, timeout=180)
    later = stack.wait(stack.submit(fault_job(tmp_path / "later", "crash", seed=7, deploy=repo)), timeout=120)

    versions = repository.versions("crash")
    plan = repository.served_plan("crash")
    chaos_report("4 kill -9 between claim and publish", ended, later, recovery_s=finished(ended) - killed,
                 duplicated=sum(repository.manifest("crash", v)["job_id"] == job_id for v in versions) - 1,
                 versions=versions, served_versions=plan.versions if plan else None)
    assert claimed_only == ([], True)  # killed with version 1 claimed and not published
    assert ended["state"] == "SUCCEEDED", ended.get("error")
    assert ended["stages"]["deploy"]["version"] == 2  # the redelivered deploy took the next number
    assert later["state"] == "SUCCEEDED", later.get("error")
    assert later["stages"]["deploy"]["version"] == 3
    assert versions == [2, 3]  # version 1 is never listed
    assert [repository.manifest("crash", v)["job_id"] for v in versions] == [job_id, later["id"]]
    assert 1 not in plan.versions and repository.resolve("crash", "production") == 3
    with pytest.raises(UserInputError):
        repository.resolve("crash", "1")


OUTAGE_S = 8


def test_a_gs_outage_during_deploy_is_retried_and_the_job_deploys_exactly_once(
    make_stack, tmp_path, proxies, stoppable_emulator, monkeypatch
):
    """The proxy hangs on the version claim; the emulator is then stopped, its connections cut, and it
    is started again OUTAGE_S later with its data."""
    host, start_emulator, stop_emulator = stoppable_emulator
    stack, proxy, repo = gcs_stack(make_stack, proxies, host, monkeypatch)
    proxy.hang_on(b"outage/1/.claim")

    job_id = stack.submit(fault_job(tmp_path, "outage", deploy=repo))
    wait_for(proxy.triggered, "the claim of version 1")
    stop_emulator()
    proxy.sever()
    proxy.heal()  # connections reach the proxy again, and find nothing behind it
    time.sleep(OUTAGE_S)
    start_emulator()
    back = time.time()
    ended = stack.wait(job_id, timeout=240)
    served = stack.wait(stack.submit(fault_job(tmp_path, "after-outage", seed=1, deploy=repo)), timeout=120)

    repository = ModelRepository.open(repo)
    versions = repository.versions("outage")
    deploy = ended["stages"].get("deploy", {})
    chaos_report("5 gs:// outage during deploy", ended, served, recovery_s=finished(ended) - back,
                 duplicated=len(versions) - 1, outage_s=OUTAGE_S, deploy_attempts=deploy.get("attempt"),
                 versions=versions)
    if ended["state"] == "FAILED":  # the retries ran out: the message must say storage was unavailable
        assert "storage unavailable" in ended["error"], ended["error"]
        assert versions == []
    else:
        assert ended["state"] == "SUCCEEDED", ended.get("error")
        assert versions == [1] and repository.resolve("outage", "production") == 1
    assert served["state"] == "SUCCEEDED", served.get("error")
    assert repository.versions("after-outage") == [1]
