"""The producer's Python API: ``submit``, ``status``, ``wait``, ``cancel``.

``submit`` validates the job file, uploads the local source into the artifact store by
content, records the job in Redis and enqueues one Celery chain
convert → optimize (one task per variant, then a selection) → deploy. Messages carry
job ids and step keys only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import redis
from celery import chain, chord, group

from shared.celery_app import make_celery
from shared.errors import UserInputError
from shared.jobs import CANCELLED, TERMINAL, JobStore, new_job_id
from shared.jobspec import BASELINE, JobSpec, load_job
from shared.settings import Settings, get_settings
from shared.storage import ArtifactStore, digest_of_files, open_store



class BrokerUnavailable(Exception):
    """Redis could not be reached after a few retries."""


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
                raise BrokerUnavailable(f"cannot reach Redis at {_redact(url)}: {exc}") from None
            time.sleep(delay * (attempt + 1))
        except redis.AuthenticationError:
            raise BrokerUnavailable(f"Redis at {_redact(url)} refused the password") from None
    raise AssertionError("unreachable")


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def queue_for(spec: JobSpec, stage: str, variant: str | None = None) -> str:
    """The pool a stage runs on: a pin in ``pools`` wins; else gpu-benefiting variants follow ``device``."""
    if stage in spec.pools:
        return spec.pools[stage]
    if stage == "compress":  # training: the gpu pool when the job asks for it
        return "gpu" if spec.device == "gpu" else "cpu"
    if stage == "optimize" and variant and variant != BASELINE and spec.device == "gpu":
        from worker.plugins import registry

        if any(registry.optimizers[p].gpu_benefit for p in spec.optimize.variant(variant).parts):
            return "gpu"
    return "cpu"


def _resolve_local(path: str, base: Path, field: str) -> Path:
    resolved = (base / path).expanduser().resolve()
    if not resolved.exists():
        raise UserInputError(f"{field}: {path} does not exist (looked for {resolved})")
    return resolved


def _resolve_uri(uri: str, base: Path) -> str:
    if uri.startswith("gs://"):
        return uri
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return (base / path).expanduser().resolve().as_uri()


def _check_eval_data(path: Path) -> Path:
    """Refuse, before anything is uploaded, an eval file that is not an .npz with a 'labels' array."""
    import zipfile

    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            names = list(data.files)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise UserInputError(f"model.eval_data: {path.name} is not a readable .npz ({exc})") from None
    if "labels" not in names:
        raise UserInputError(
            f"model.eval_data: {path.name} has no 'labels' array (it has: {', '.join(names) or 'nothing'})"
        )
    if len(names) < 2:
        raise UserInputError(f"model.eval_data: {path.name} has labels but no model inputs")
    return path


def submit(job_file: str | Path, *, settings: Settings | None = None) -> str:
    """Validate, upload and enqueue a job; returns its id. UserInputError for a bad job file."""
    settings = settings or get_settings()
    spec, base = load_job(job_file)
    source = _resolve_local(spec.model.source, base, "model.source")
    samples_path = _resolve_local(spec.model.samples, base, "model.samples") if spec.model.samples else None
    eval_path = None
    if spec.model.eval_data:
        eval_path = _check_eval_data(_resolve_local(spec.model.eval_data, base, "model.eval_data"))
    distill = spec.compress.distill if spec.compress else None
    distill_path = _resolve_local(distill.data, base, "compress.distill.data") if distill else None
    if spec.deploy:
        deploy = spec.deploy.model_copy(update={"repository": _resolve_uri(spec.deploy.repository, base)})
        spec = spec.model_copy(update={"deploy": deploy})
    jobs = connect(settings)  # fail before uploading anything when Redis is down

    store = open_store(settings.resolved_artifact_store())
    job_id = record(jobs, store, spec, source, samples_path=samples_path, eval_path=eval_path,
                    distill_path=distill_path)
    try:
        result = build_chain(spec, job_id).apply_async()
    except Exception as exc:  # nothing half-recorded: a job that was not enqueued does not exist
        jobs.delete(job_id)
        raise BrokerUnavailable(f"could not enqueue job: {exc}") from None
    result_id = result.id
    _forget_locally(result)
    jobs.set_fields(job_id, result_id=result_id)
    return job_id


def record(jobs: JobStore, store: ArtifactStore, spec: JobSpec, source: Path, *, samples_path: Path | None = None,
           eval_path: Path | None = None, distill_path: Path | None = None) -> str:
    """Upload a job's inputs and write its record (not yet enqueued); returns the new job id."""
    files = store.put_dir(source) if source.is_dir() else [store.put_file(source)]
    if not files:
        raise UserInputError(f"model.source: {source} is an empty folder")
    samples = store.put_file(samples_path).to_dict() if samples_path else None
    eval_data = store.put_file(eval_path).to_dict() if eval_path else None
    distill_data = store.put_file(distill_path).to_dict() if distill_path else None
    job_id = new_job_id()
    jobs.create(job_id, {
        "spec": spec.model_dump(mode="json"),
        "model": spec.model.name,
        "artifact_store": store.uri,
        "source": {"files": [f.to_dict() for f in files], "digest": digest_of_files(files),
                   "is_folder": source.is_dir(), "path": str(source)},
        "samples": samples,
        "eval_data": eval_data,
        "distill_data": distill_data,
        "queues": _plan(spec),
    })
    return job_id


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


def _plan(spec: JobSpec) -> dict[str, str]:
    plan = {"compress": queue_for(spec, "compress")} if spec.compress else {}
    plan["convert"] = queue_for(spec, "convert")
    if spec.optimize:
        for variant in [BASELINE, *spec.optimize.ids]:
            plan[f"optimize:{variant}"] = queue_for(spec, "optimize", variant)
        plan["select"] = queue_for(spec, "select")
    if spec.deploy:
        plan["deploy"] = queue_for(spec, "deploy")
    return plan


def shown(job_id: str, model: str, stage: str, variant: str | None = None, inputs: str = "") -> dict[str, str]:
    """What Flower shows as a stage task's arguments: job, model, stage and variant, never step-key blobs.

    ``kwargsrepr`` stays a dict literal so that Flower's ``kwargs:job_id=…`` search still works.
    """
    kwargs = {"stage": stage, **({"variant": variant} if variant else {}), "model": model, "job_id": job_id}
    return {"kwargsrepr": repr(kwargs), "argsrepr": f"({inputs})" if inputs else "()"}


def build_chain(spec: JobSpec, job_id: str):
    app = _celery(broker_url())
    name = spec.model.name
    common = {"job_id": job_id, "model": name}
    last = "deploy" if spec.deploy else "optimize" if spec.optimize else "convert"
    steps = []
    if spec.compress:  # the student it returns is what convert converts
        steps.append(app.signature("modelyard.compress", kwargs=common, queue=queue_for(spec, "compress"),
                                   immutable=True, **shown(job_id, name, "compress")))
    steps.append(app.signature("modelyard.convert", kwargs={**common, "final": last == "convert"},
                               queue=queue_for(spec, "convert"), immutable=not spec.compress,
                               **shown(job_id, name, "convert", inputs="student model" if spec.compress else "")))
    if spec.optimize:
        ids = [BASELINE, *spec.optimize.ids]
        variants = [
            app.signature("modelyard.optimize", kwargs={**common, "variant": v},
                          queue=queue_for(spec, "optimize", v), ignore_result=False,  # joined by the chord
                          **shown(job_id, name, "optimize", v, "converted model"))
            for v in ids
        ]
        selector = app.signature("modelyard.select", kwargs={**common, "final": last == "optimize"},
                                 queue=queue_for(spec, "select"),
                                 **shown(job_id, name, "select", inputs="measured variants: " + ", ".join(ids)))
        steps.append(chord(group(variants), selector))
    if spec.deploy:
        steps.append(app.signature("modelyard.deploy", kwargs={**common, "final": True},
                                   queue=queue_for(spec, "deploy"),
                                   **shown(job_id, name, "deploy", inputs="selected variant")))
    return chain(*steps)


def status(job_id: str, *, settings: Settings | None = None) -> dict[str, Any]:
    job = connect(settings).get(job_id)
    if job is None:
        raise UserInputError(f"no job {job_id!r} (it may have expired or never been submitted)")
    return job


def wait(job_id: str, *, timeout: float | None = None, poll: float = 0.5,
         on_update: Callable[[dict], None] | None = None, settings: Settings | None = None) -> dict[str, Any]:
    """Block until the job reaches a terminal state (or timeout: TimeoutError)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    jobs = connect(settings)
    while True:
        job = jobs.get(job_id)
        if job is None:
            raise UserInputError(f"no job {job_id!r}")
        if on_update:
            on_update(job)
        if job["state"] in TERMINAL:
            return job
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job['state']} after {timeout} s")
        time.sleep(poll)


def cancel(job_id: str, *, settings: Settings | None = None) -> bool:
    """Cancel a job: stages not yet started never run, and nothing is deployed after this."""
    jobs = connect(settings)
    if not jobs.exists(job_id):
        raise UserInputError(f"no job {job_id!r}")
    return jobs.set_state(job_id, CANCELLED, "cancelled by user")
