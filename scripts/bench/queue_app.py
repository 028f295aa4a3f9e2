"""The two Celery apps of the queue benchmark (``scripts/bench/queue_throughput.py``).

* ``app``: modelyard's own Celery app (``worker.app``, built by ``shared.celery_app.make_celery``:
  JSON only, acks_late, reject on worker lost, prefetch 1, Redis result backend, task events
  on demand, the cpu/gpu queues) with one more task, ``bench.noop_stage``, on the same ``StageTask`` base as
  the real stages: cancellation check, redelivery count, job state RUNNING, the stage record
  written as running and then as done — everything ``StageTask.run_stage`` does around a stage —
  and a stage body that does nothing.
* ``bare``: a Celery app with every default (JSON, early acks, prefetch 4, no result backend)
  and a no-op task.

Both tasks end with the same one Redis ``INCR`` of a counter, which is how the benchmark sees
that all messages are done. Start the workers with ``celery -A scripts.bench.queue_app[:bare]``
from the repository root; ``MODELYARD_BROKER_URL`` and ``BENCH_BARE_BROKER_URL`` name the brokers.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

from shared.broker import redis_client
from worker.tasks import StageTask, app


def done_key(run: str) -> str:
    return f"bench:done:{run}"


@app.task(bind=True, base=StageTask, name="bench.noop_stage", stage="noop")
def noop_stage(self: StageTask, *, job_id: str, model: str, stage: str, run: str) -> dict:
    def work(ctx) -> dict:
        ctx.jobs.update_stage(job_id, stage, state="done", finished=time.time())
        ctx.jobs.redis.incr(done_key(run))
        return {"stage": stage}

    return self.run_stage(stage, job_id, work)


bare = Celery("bare", broker=os.environ.get("BENCH_BARE_BROKER_URL", "memory://"), set_as_current=False)
_bare_client: redis.Redis | None = None


@bare.task(name="bench.noop")
def noop(*, run: str) -> None:
    global _bare_client
    if _bare_client is None:  # made in the worker's child process, after the fork
        _bare_client = redis_client(bare.conf.broker_url)
    _bare_client.incr(done_key(run))
