"""Thin Celery tasks: arguments, job bookkeeping, retries. The work is in ``worker.stages``.

Every task takes keyword arguments that read well in Flower (job id, model, stage, variant)
and passes small JSON results down the chain: step keys, never model bytes.
"""

from __future__ import annotations

import errno
import logging
import tempfile
import time
from typing import Any

import redis
from celery import Task
from celery.exceptions import Ignore, Reject, SoftTimeLimitExceeded, TimeLimitExceeded
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from shared.celery_app import configured_broker_url
from shared.errors import TransientError, UserInputError
from shared.gc import remember_repository
from shared.inference.hardware import pool_of_queue
from shared.jobs import (
    FAILED,
    STAGE_CACHED,
    STAGE_CANCELLED,
    STAGE_DONE,
    STAGE_FAILED,
    STAGE_RUNNING,
    SUCCEEDED,
    JobStore,
)
from shared.pipeline import uploaded_files
from shared.settings import get_settings
from worker import metrics
from worker.app import app
from worker.context import JobCancelled, StageContext

log = logging.getLogger("modelyard.worker")
settings = get_settings()
_jobs: JobStore | None = None


def job_store() -> JobStore:
    global _jobs
    if _jobs is None:  # one connection pool per worker process, made after the fork
        # Patient: a stage rides out a Redis restart of ~15 s instead of failing while it records its state.
        _jobs = JobStore.from_url(configured_broker_url(app.conf),
                                  retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), 10))
    return _jobs


class StageTask(Task):
    autoretry_for = (TransientError, redis.ConnectionError, redis.TimeoutError, ConnectionError)
    retry_backoff = 2
    retry_backoff_max = 60
    retry_jitter = True
    max_retries = settings.max_retries
    stage = ""

    def context(self, job_id: str) -> StageContext:
        info = self.request.delivery_info or {}
        return StageContext(
            settings=settings,
            jobs=job_store(),
            job_id=job_id,
            worker=self.request.hostname or "local",
            # A class queue (cpu.cpu-avx2) belongs to its pool: the stage's providers follow the pool.
            queue=pool_of_queue(info.get("routing_key") or "cpu"),
        )

    def run_stage(self, stage: str, job_id: str, work) -> Any:
        ctx = self.context(job_id)
        try:
            self.begin(ctx, stage)
            with metrics.track_stage(stage, ctx.queue) as tracked:
                result = work(ctx)
                if isinstance(result, dict) and "error" in result:
                    tracked.outcome = "failed"  # an optimize variant that returned its error
                return result
        except JobCancelled:
            ctx.jobs.update_stage(job_id, stage, state=STAGE_CANCELLED, finished=time.time())
            raise Ignore() from None
        except SoftTimeLimitExceeded:
            raise UserInputError(
                f"stage {stage} exceeded its time limit of {settings.stage_soft_time_limit_s} s "
                "(MODELYARD_STAGE_SOFT_TIME_LIMIT_S)"
            ) from None
        except MemoryError as exc:  # re-raised as is, Celery takes the whole worker down
            raise UserInputError(
                f"stage {stage} ran out of memory ({exc or 'MemoryError'}); run it on a worker with more memory"
            ) from None
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            # Not retried: a disk that filled up stays full until someone frees it.
            where = f" writing {exc.filename}" if exc.filename else ""
            raise UserInputError(
                f"stage {stage} ran out of disk space (no space left on device{where}); the worker's scratch "
                f"space is TMPDIR={tempfile.gettempdir()}: free space there or give the worker a bigger disk"
            ) from None

    def retry(self, *args: Any, **kwargs: Any):
        """As Celery's, but a retry that cannot be published (broker down) returns the message to the
        queue instead of dropping it, which would leave the job RUNNING forever."""
        try:
            return super().retry(*args, **kwargs)
        except Reject as exc:
            if exc.requeue:
                raise
            log.warning("could not publish the retry of %s (%s): requeueing the message", self.name, exc.reason)
            raise Reject(exc.reason, requeue=True) from None

    def begin(self, ctx: StageContext, stage: str) -> None:
        """The job is not cancelled, the stage not redelivered too often: job RUNNING, stage running.

        One script in Redis (``JobStore.begin_stage``), one round trip. A message whose worker process
        died (SIGKILL, out of memory, segfault) returns to the queue (``task_reject_on_worker_lost``)
        with the same task id and retry count, so the deliveries of one attempt are counted in Redis;
        past ``max_retries`` redeliveries the stage fails instead of being redelivered forever.
        """
        start = ctx.jobs.begin_stage(
            ctx.job_id, stage, f"modelyard:deliveries:{self.request.id}:{self.request.retries}", settings.max_retries,
            state=STAGE_RUNNING, worker=ctx.worker, queue=ctx.queue, started=time.time(),
            attempt=self.request.retries + 1,
        )
        if start.cancelled:
            raise JobCancelled(f"job {ctx.job_id} was cancelled")
        died = start.died
        if died > settings.max_retries:
            raise UserInputError(
                f"stage {stage}: the worker process died {died} times running this stage (killed, out of memory "
                f"or crashed); not redelivered again (MODELYARD_MAX_RETRIES={settings.max_retries})"
            )

    def on_failure(self, exc: BaseException, task_id: str, args: tuple, kwargs: dict, einfo: Any) -> None:
        # Also called in the worker's main process when the hard time limit killed the child.
        job_id = kwargs.get("job_id")
        if not job_id:
            return
        stage = self.stage + (f":{kwargs['variant']}" if kwargs.get("variant") else "")
        message = str(exc) if isinstance(exc, UserInputError) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, TimeLimitExceeded):
            message = (f"stage {stage} exceeded its hard time limit of {settings.stage_time_limit_s} s "
                       "(MODELYARD_STAGE_TIME_LIMIT_S); its worker process was killed and replaced")
        jobs = job_store()
        jobs.update_stage(job_id, stage, state=STAGE_FAILED, message=message, finished=time.time())
        if jobs.set_state(job_id, FAILED, f"{stage}: {message}"):
            metrics.job_finished(FAILED)
        log.warning("job %s failed in %s: %s", job_id, stage, message)


def _finish(ctx: StageContext, final: bool, summary: dict) -> None:
    if final:
        ctx.jobs.set_fields(ctx.job_id, result=summary)
        if ctx.jobs.set_state(ctx.job_id, SUCCEEDED):
            metrics.job_finished(SUCCEEDED)


def _stage_record(manifest, cached: bool) -> dict:
    return {
        "state": STAGE_CACHED if cached else STAGE_DONE,
        "finished": time.time(),
        "step_key": manifest.step_key,
        "computed_by": manifest.worker,
        "files": [f.to_dict() for f in manifest.files],
        "size_bytes": manifest.size,
        "metrics": manifest.metrics,
    }


@app.task(bind=True, base=StageTask, name="modelyard.compress", stage="compress")
def compress(self: StageTask, *, job_id: str, model: str) -> dict:
    from worker.stages.compress import run_compress

    def work(ctx: StageContext) -> dict:
        manifest, cached = run_compress(ctx)
        result = {"compress_key": manifest.step_key}
        ctx.jobs.update_stage(job_id, "compress", **_stage_record(manifest, cached), output=result)
        return result

    return self.run_stage("compress", job_id, work)


@app.task(bind=True, base=StageTask, name="modelyard.convert", stage="convert")
def convert(self: StageTask, compressed: dict | None = None, *, job_id: str, model: str, final: bool = False) -> dict:
    from worker.stages.convert import run_convert

    def work(ctx: StageContext) -> dict:
        manifest, cached = run_convert(ctx, (compressed or {}).get("compress_key"))
        result = {"model_key": manifest.step_key, "convert_key": manifest.step_key, "variant": None}
        ctx.jobs.update_stage(job_id, "convert", **_stage_record(manifest, cached), output=result)
        _finish(ctx, final, result)
        return result

    return self.run_stage("convert", job_id, work)



@app.task(bind=True, base=StageTask, name="modelyard.optimize", stage="optimize")
def optimize(self: StageTask, converted: dict, *, job_id: str, model: str, variant: str) -> dict:
    from worker.stages.optimize import run_variant, variant_summary

    stage = f"optimize:{variant}"

    def work(ctx: StageContext) -> dict:
        try:
            manifest, cached = run_variant(ctx, converted["convert_key"], variant)
        except UserInputError as exc:  # one broken variant must not sink its siblings
            ctx.jobs.update_stage(job_id, stage, state=STAGE_FAILED, message=str(exc), finished=time.time())
            return {"variant": variant, "error": str(exc), "worker": ctx.worker, "queue": ctx.queue}
        summary = variant_summary(variant, manifest, cached, ctx)
        ctx.jobs.update_stage(job_id, stage, **_stage_record(manifest, cached), summary=summary)
        return {**summary, "convert_key": converted["convert_key"]}

    return self.run_stage(stage, job_id, work)



@app.task(bind=True, base=StageTask, name="modelyard.select", stage="select")
def select(self: StageTask, results: list[dict], *, job_id: str, model: str, final: bool = False) -> dict:
    from worker.stages.select_measure import run_select

    def work(ctx: StageContext) -> dict:
        outcome = run_select(ctx, results)
        best = outcome.selection.best
        message = outcome.selection.message
        ctx.jobs.update_stage(job_id, "select", finished=time.time(), table=outcome.selection.table,
                              selected=best["variant"] if best else None, hardware=outcome.hardware,
                              measurement=outcome.measurement, note=message)
        if outcome.failure:
            raise UserInputError(outcome.failure)
        result = {"model_key": best["step_key"], "convert_key": best["convert_key"], "variant": best["variant"],
                  **({"message": message} if message else {})}
        ctx.jobs.update_stage(job_id, "select", state=STAGE_DONE, output=result)  # output: worker.redrive's input
        _finish(ctx, final, result)
        return result

    return self.run_stage("select", job_id, work)



@app.task(bind=True, base=StageTask, name="modelyard.deploy", stage="deploy")
def deploy(self: StageTask, chosen: dict, *, job_id: str, model: str, final: bool = True) -> dict:
    from worker.stages.deploy import run_deploy

    def work(ctx: StageContext) -> dict:
        record = ctx.record
        lineage = {
            "source_digest": record["source"]["digest"],
            "uploads": uploaded_files(record),  # what modelyard gc keeps for this version, with the step keys below
            "variant": chosen.get("variant"),
            "stages": {name: {k: v for k, v in s.items() if k in ("step_key", "metrics", "computed_by")}
                       for name, s in record["stages"].items()},
            "spec": record["spec"],
            "variants": record["stages"].get("select", {}).get("table"),
            # what the variants were timed on, and how: every latency figure above holds for this hardware
            "hardware": record["stages"].get("select", {}).get("hardware"),
            "measurement": record["stages"].get("select", {}).get("measurement"),
            **({"message": chosen["message"]} if chosen.get("message") else {}),
        }
        result = run_deploy(ctx, chosen["model_key"], chosen["convert_key"], lineage)
        remember_repository(ctx.store, result["repository"])  # modelyard gc keeps the lineage of its versions
        ctx.jobs.update_stage(job_id, "deploy", state=STAGE_DONE, finished=time.time(), **result)
        _finish(ctx, final, {**chosen, **result})
        return result

    return self.run_stage("deploy", job_id, work)

