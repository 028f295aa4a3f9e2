"""The producer's Python API: ``validate``, ``submit``, ``status``, ``wait``, ``cancel``.

``submit`` validates the job file, uploads the local source into the artifact store by
content, records the job in Redis and enqueues one Celery chain
convert → optimize (one task per variant, then a selection) → deploy. Messages carry
job ids and step keys only. Reading the job file, the record and the chain are
``shared.pipeline``'s, which ``worker.local`` (``modelyard run``) shares.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import redis
from redis.sentinel import MasterNotFoundError

from shared import pipeline
from shared.broker import redact
from shared.celery_app import make_celery
from shared.errors import UserInputError
from shared.jobs import CANCELLED, TERMINAL, JobStore
from shared.jobspec import JobSpec
from shared.settings import Settings, get_settings
from shared.storage import ArtifactStore, open_store

# How long ``wait`` rides out a lost connection to Redis (a restart) before giving up.
OUTAGE_GRACE_S = 30.0


class BrokerUnavailable(Exception):
    """Redis could not be reached after a few retries."""


class WaitTimeout(TimeoutError):
    """``wait`` gave up: the job had not ended within its timeout (it keeps running)."""


@lru_cache(maxsize=4)
def _celery(broker_url: str):
    app = make_celery(get_settings(), broker_url=broker_url)
    # The producer never waits on Celery results (job state lives in the job record), so it must
    # not subscribe to every sent task's result channel, as the Redis backend does by default.
    app.backend.on_task_call = lambda producer, task_id: None
    return app


def broker_url(settings: Settings | None = None) -> str:
    settings = settings or get_settings()
    url = settings.resolved_broker_url()
    if not url:
        raise UserInputError(
            "no broker configured: set MODELYARD_BROKER_URL, or start the local stack with 'modelyard up'"
        )
    return url


def connect(settings: Settings | None = None, *, attempts: int = 3, delay: float = 1.0) -> JobStore:
    """A job store on a Redis that answers, retrying briefly before giving up."""
    url = broker_url(settings)
    jobs = JobStore.from_url(url)
    for attempt in range(attempts):
        try:
            jobs.redis.ping()
            return jobs
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if attempt == attempts - 1:
                raise BrokerUnavailable(f"cannot reach Redis at {_redact(url)}: {_reason(exc)}") from None
            time.sleep(delay * (attempt + 1))
        except redis.AuthenticationError:
            raise BrokerUnavailable(f"Redis at {_redact(url)} refused the password") from None
    raise AssertionError("unreachable")


def _redact(url: str) -> str:
    return redact(url)  # every part of a sentinel URL, and its sentinel_password


def _reason(exc: Exception) -> str:
    if isinstance(exc, MasterNotFoundError):  # its own text lists every sentinel client's settings
        return "no sentinel named a master (are the sentinels up, and is master_name theirs?)"
    return str(exc)


def gpu_benefit(optimizer: str) -> bool:
    """Whether an optimizer plugin runs faster on a GPU (its variants follow ``device: gpu``)."""
    import worker.plugins  # the package's registry of plugins (importing it registers them)

    return worker.plugins.registry.optimizers[optimizer].gpu_benefit


def queue_for(spec: JobSpec, stage: str, variant: str | None = None) -> str:
    """The pool a stage runs on: a pin in ``pools`` wins; else gpu-benefiting variants follow ``device``."""
    return pipeline.queue_for(spec, stage, variant, gpu_benefit=gpu_benefit)


def plan(spec: JobSpec) -> dict[str, str]:
    """Each stage of the job and the pool it runs on, as the job record keeps it."""
    return pipeline.plan(spec, gpu_benefit=gpu_benefit)


def validate(job_file: str | Path) -> JobSpec:
    """Everything ``submit`` checks before it contacts Redis: schema, plugins and parameters, local files.

    Returns the spec as it would be submitted; UserInputError naming the field when something is wrong.
    """
    return _checked(job_file).spec


def _checked(job_file: str | Path) -> pipeline.JobInputs:
    inputs = pipeline.prepare(job_file)
    from worker.plugins import catalog  # imports every plugin module: only when a job is checked

    catalog.check_job(inputs.spec, origin=str(job_file))
    return inputs


def submit(job_file: str | Path, *, settings: Settings | None = None) -> str:
    """Validate, upload and enqueue a job; returns its id. UserInputError for a bad job file."""
    settings = settings or get_settings()
    inputs = _checked(job_file)
    jobs = connect(settings)  # fail before uploading anything when Redis is down
    store = open_store(settings.resolved_artifact_store())
    queues = plan(inputs.spec)
    job_id = pipeline.record(jobs, store, inputs, queues)
    try:
        result = pipeline.build_chain(_celery(broker_url(settings)), inputs.spec, job_id, queues).apply_async()
    except Exception as exc:  # nothing half-recorded: a job that was not enqueued does not exist
        jobs.delete(job_id)
        raise BrokerUnavailable(f"could not enqueue job: {exc}") from None
    result_id = result.id
    _forget_locally(result)
    jobs.set_fields(job_id, result_id=result_id)
    return job_id


def unserved_target(job_file: str | Path, *, settings: Settings | None = None, timeout: float = 1.0) -> str | None:
    """The class queue of the job's ``optimize.target`` when no online worker consumes it, else None.

    The job still waits there (a worker of that class may join later); the CLI warns.
    """
    spec = validate(job_file)
    if not spec.optimize or not spec.optimize.target:
        return None
    queue = queue_for(spec, "select")
    app = _celery(broker_url(settings))
    active = app.control.inspect(timeout=timeout).active_queues() or {}
    served = {q.get("name") for queues in active.values() for q in (queues or []) if isinstance(q, dict)}
    return None if queue in served else queue


def record(jobs: JobStore, store: ArtifactStore, spec: JobSpec, source: Path, *, samples_path: Path | None = None,
           eval_path: Path | None = None, distill_path: Path | None = None) -> str:
    """Upload a job's inputs and write its record (not yet enqueued); returns the new job id."""
    inputs = pipeline.JobInputs(spec=spec, source=source, samples=samples_path, eval_data=eval_path,
                                distill_data=distill_path)
    return pipeline.record(jobs, store, inputs, plan(spec))


def _forget_locally(result) -> None:
    """Drop the chain's results from this process's pending set: the producer follows the job
    record, not Celery results, and pending results keep Redis subscriptions open until exit."""
    todo = [result]
    while todo:
        node = todo.pop()
        if node is None:
            continue
        todo.extend(getattr(node, "results", None) or [])  # a group's members
        todo.append(node.parent)
        if not hasattr(node, "results"):
            node.backend.remove_pending_result(node)


def status(job_id: str, *, settings: Settings | None = None) -> dict[str, Any]:
    job = connect(settings).get(job_id)
    if job is None:
        raise UserInputError(f"no job {job_id!r} (it may have expired or never been submitted)")
    return job


def wait(job_id: str, *, timeout: float | None = None, poll: float = 0.5,
         on_update: Callable[[dict], None] | None = None, settings: Settings | None = None) -> dict[str, Any]:
    """Block until the job reaches a terminal state.

    WaitTimeout after ``timeout`` seconds; BrokerUnavailable when Redis stays unreachable for
    ``OUTAGE_GRACE_S`` (a shorter outage, such as a restart, is ridden out).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    jobs = connect(settings)
    lost_since: float | None = None
    while True:
        try:
            job = jobs.get(job_id)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since > OUTAGE_GRACE_S:
                raise BrokerUnavailable(
                    f"lost the connection to Redis at {_redact(broker_url(settings))} while waiting for job "
                    f"{job_id} ({_reason(exc)}); the job may still be running"
                ) from None
            time.sleep(poll)
            continue
        lost_since = None
        if job is None:
            raise UserInputError(f"no job {job_id!r}")
        if on_update:
            on_update(job)
        if job["state"] in TERMINAL:
            return job
        if deadline is not None and time.monotonic() > deadline:
            raise WaitTimeout(f"job {job_id} is still {job['state']} after {timeout:g} s")
        time.sleep(poll)


def cancel(job_id: str, *, settings: Settings | None = None) -> bool:
    """Cancel a job: stages not yet started never run, and nothing is deployed after this."""
    jobs = connect(settings)
    if not jobs.exists(job_id):
        raise UserInputError(f"no job {job_id!r}")
    return jobs.set_state(job_id, CANCELLED, "cancelled by user")
