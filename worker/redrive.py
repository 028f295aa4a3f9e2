"""Jobs whose next stage's message was lost: found, and that stage sent again.

Celery over Redis takes a message with BRPOP. A reply that reaches a connection the client is
replacing is dropped with the message in it (kombu 5.7, after a network partition that hung
connections healed: ``tests/reliability/test_chaos.py``); a broker that lost writes (a failover
before replication, a restore from an old snapshot) does the same. Such a message is in no queue
and not in ``unacked``, so nothing redelivers it, and its job would stay RUNNING for ever.

Every worker's main process runs a thread (``start``) that, every ``interval`` seconds, takes a
short Redis lock (one worker of the fleet scans at a time) and looks at the QUEUED and RUNNING jobs
of the index. A job is *stalled* when no stage of it is running, nothing was recorded on it for
``MODELYARD_REDRIVE_AFTER_S``, and no message naming it is waiting in any of its queues or reserved
(``unacked``). Its next stage is then sent again (``shared.pipeline.resume_chain``) with the output
the stage before it recorded: ``compress`` and ``convert`` from the start, the optimize chord
(every variant; those already built are found in the step cache) with the converted model,
``deploy`` with the selected variant. A job that needs this more than ``MAX_REDRIVES`` times fails,
naming the lost messages. A message that is merely late (a long queue, no worker of its pool
online) is in its queue: that job is left alone.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis

from shared.jobs import FAILED, INDEX, PREFIX, QUEUED, RUNNING, STAGE_FINISHED, STAGE_RUNNING, JobStore
from shared.pipeline import RESUMABLE
from shared.queues import KOMBU_UNACKED_KEY, queue_keys
from shared.settings import Settings

log = logging.getLogger("modelyard.redrive")
LOCK = "modelyard:redrive"
MAX_REDRIVES = 3
SCAN_JOBS = 2000  # the most recent jobs of the index looked at per pass


def next_stage(record: dict[str, Any], now: float, after_s: float) -> tuple[str, Any] | None:
    """(stage to resume at, its input) when the job looks stalled by its record alone, else None."""
    stages = record.get("stages") or {}
    if any(stage.get("state") == STAGE_RUNNING for stage in stages.values()):
        return None
    last = max(float(record.get("updated") or 0), float(record.get("created") or 0),
               float(record.get("redriven_at") or 0))
    if now - last < after_s:
        return None
    given = None  # the output of the last finished stage that hands one on (compress, convert, select)
    for name in record.get("queues") or {}:
        stage = stages.get(name, {})
        if stage.get("state") in STAGE_FINISHED:
            if isinstance(stage.get("output"), dict):
                given = stage["output"]
            continue
        resume = "optimize" if name.startswith("optimize:") or name == "select" else name
        if resume not in RESUMABLE:
            return None
        if given is None and name != next(iter(record["queues"])):
            return None  # only the chain's first stage takes no input (a record from before outputs were kept)
        return resume, given
    return None


def has_message(client: redis.Redis, job_id: str, queues: set[str], transport_options: dict | None) -> bool:
    """Whether a message of this job waits in one of queues (any priority) or is reserved by a worker."""
    needle = job_id.encode()
    options = transport_options or {}
    for queue in queues:
        for key in queue_keys(queue, options):
            if any(needle in raw for raw in client.lrange(key, 0, -1)):
                return True
    unacked = (options.get("global_keyprefix", "") or "") + options.get("unacked_key", KOMBU_UNACKED_KEY)
    return any(needle in raw for raw in client.hvals(unacked))


def redrive_pass(app, jobs: JobStore, settings: Settings, now: float | None = None) -> list[tuple[str, str]]:
    """One scan: the (job, stage) pairs sent again (or failed, past MAX_REDRIVES)."""
    from shared.jobspec import JobSpec
    from shared.pipeline import resume_chain

    now = time.time() if now is None else now
    options = dict(app.conf.broker_transport_options or {})
    done = []
    ids = [raw.decode() for raw in jobs.redis.zrevrange(INDEX, 0, SCAN_JOBS - 1)]
    with jobs.redis.pipeline(transaction=False) as pipe:  # one round trip for every job's state, not one each
        for job_id in ids:
            pipe.hget(PREFIX + job_id, "state")
        states = pipe.execute()
    for job_id, state in zip(ids, states, strict=True):
        if state is None or state.decode() not in (QUEUED, RUNNING):
            continue
        record = jobs.get(job_id)
        found = next_stage(record, now, settings.redrive_after_s) if record else None
        if found is None:
            continue
        stage, given = found
        queues = set((record.get("queues") or {}).values())
        if has_message(jobs.redis, job_id, queues, options):
            continue
        count = int(record.get("redrives") or 0)
        if count >= MAX_REDRIVES:
            jobs.set_state(job_id, FAILED, f"{stage}: the stage's message was lost {count + 1} times (the broker "
                                           "dropped it; see the workers' logs and the broker's health)")
            done.append((job_id, stage))
            continue
        jobs.set_fields(job_id, redrives=count + 1, redriven_at=now)
        resume_chain(app, JobSpec.model_validate(record["spec"]), job_id, record["queues"], stage,
                     given).apply_async()
        log.warning("job %s: no stage running, no message queued and nothing recorded for %.0f s: the %s "
                    "stage's message was lost; sent it again (%d of %d)", job_id, now - float(record["updated"]),
                    stage, count + 1, MAX_REDRIVES)
        done.append((job_id, stage))
    return done


def start(broker_url: str, settings: Settings, worker: str) -> threading.Thread | None:
    """The scanning thread of a worker's main process (None when MODELYARD_REDRIVE_AFTER_S is 0)."""
    if settings.redrive_after_s <= 0:
        return None
    interval = max(1.0, min(60.0, settings.redrive_after_s / 4))
    thread = threading.Thread(target=_loop, args=(broker_url, settings, worker, interval), daemon=True,
                              name="modelyard-redrive")
    thread.start()
    return thread


def _loop(broker_url: str, settings: Settings, worker: str, interval: float) -> None:
    from shared.celery_app import make_celery

    app = make_celery(settings, broker_url=broker_url)  # its own connections: the consumer's stay its own
    jobs = JobStore.from_url(broker_url)
    while True:
        time.sleep(interval)
        try:
            if jobs.redis.set(LOCK, worker, nx=True, ex=max(1, int(interval))):
                redrive_pass(app, jobs, settings)
        except Exception as exc:  # Redis away, a malformed record: the next pass tries again
            log.info("redrive pass skipped: %s", exc)
