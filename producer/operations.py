"""What an operator asks of a running system: queue depths, online workers, recent jobs.

Plain functions over a Redis client, a Celery app and a ``JobStore``, so that the CLI
(``producer.cli_operations``) stays thin. The queue counting itself (kombu's Redis layout) lives
in ``shared.queues``, which the worker's metrics endpoint reads too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import redis

from shared.celery_app import QUEUES
from shared.errors import UserInputError
from shared.inference.hardware import class_of_queue
from shared.jobs import INDEX, PREFIX, TERMINAL, JobStore
from shared.queues import class_queues, queue_depth, unacked_counts

STATES = ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
ERROR_SUMMARY_CHARS = 120


# -- queues -----------------------------------------------------------------------------------
def consumers(active_queues: dict[str, list[dict]] | None) -> dict[str, list[str]]:
    """Worker names per queue, from ``app.control.inspect().active_queues()``."""
    found: dict[str, list[str]] = {}
    for worker, queues in sorted((active_queues or {}).items()):
        for queue in queues or []:
            name = queue.get("name") if isinstance(queue, dict) else None
            if name:
                found.setdefault(name, []).append(worker)
    return found


def queue_report(client: redis.Redis, *, active_queues: dict[str, list[dict]] | None = None,
                 queues: Iterable[str] = QUEUES, transport_options: dict | None = None) -> list[dict[str, Any]]:
    """One row per queue: depth (waiting), unacked (reserved/running), consumers (online workers).

    Besides the pools' queues: every hardware-class queue (``cpu.cpu-avx2``) that an online worker
    consumes or that holds messages, so a job whose ``optimize.target`` no worker serves shows up
    as a class queue with messages and no consumer.
    """
    by_queue = consumers(active_queues)
    waiting = class_queues(client, queues, transport_options)
    queues = list(dict.fromkeys([*queues, *sorted(set(by_queue) | waiting)]))
    unacked = unacked_counts(client, queues, transport_options)
    return [
        {
            "queue": queue,
            "depth": queue_depth(client, queue, transport_options),
            "unacked": unacked.get(queue, 0),
            "consumers": len(by_queue.get(queue, [])),
            "workers": by_queue.get(queue, []),
        }
        for queue in queues
    ]


# -- workers ----------------------------------------------------------------------------------
def _task_row(task: dict) -> dict[str, Any]:
    kwargs = task.get("kwargs")
    kwargs = kwargs if isinstance(kwargs, dict) else {}  # a str when a worker replied in 'safe' mode
    name = task.get("name") or task.get("type") or ""
    info = task.get("delivery_info") or {}
    return {
        "task_id": task.get("id"),
        "task": name,
        "stage": name.rsplit(".", 1)[-1] if name.startswith("modelyard.") else name,
        "job_id": kwargs.get("job_id"),
        "model": kwargs.get("model"),
        "variant": kwargs.get("variant"),
        "queue": info.get("routing_key"),
        "started": task.get("time_start"),
        "pid": task.get("worker_pid"),
    }


def workers_report(app, *, timeout: float = 1.0) -> list[dict[str, Any]]:
    """Online workers: queues, hardware class, pool, running tasks (job id, stage, variant), tasks processed.

    A worker's hardware class is the one its class queue names (``cpu.cpu-avx2`` -> ``cpu-avx2``;
    see ``worker.__main__``); None for a worker that consumes none.

    The first broadcast waits ``timeout`` for replies from workers it does not know; the next
    ones address the workers that answered and return as soon as each has replied.
    """
    active_queues = app.control.inspect(timeout=timeout).active_queues() or {}
    names = sorted(active_queues)
    if not names:
        return []
    targeted = app.control.inspect(destination=names, limit=len(names), timeout=timeout)
    active = targeted.active() or {}
    stats = targeted.stats() or {}
    rows = []
    for name in names:
        stat = stats.get(name) or {}
        pool = stat.get("pool") or {}
        totals = stat.get("total") or {}
        queues = sorted(q.get("name") for q in active_queues.get(name) or [] if isinstance(q, dict))
        rows.append({
            "name": name,
            "queues": queues,
            "hardware_class": next((c for c in map(class_of_queue, queues) if c), None),
            # "celery.concurrency.prefork:TaskPool" -> "prefork"
            "pool": (pool.get("implementation") or "").split(":", 1)[0].rsplit(".", 1)[-1] or None,
            "concurrency": pool.get("max-concurrency"),
            "pid": stat.get("pid"),
            "uptime_s": stat.get("uptime"),
            "processed": sum(v for v in totals.values() if isinstance(v, int | float)),
            "active": [_task_row(t) for t in active.get(name) or []],
        })
    return rows


# -- jobs -------------------------------------------------------------------------------------
_JOB_FIELDS = ("state", "model", "created", "updated", "finished", "error")


def _float(raw: bytes | None) -> float | None:
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def _job_row(job_id: str, values: list[bytes | None], now: float) -> dict[str, Any] | None:
    state, model, created, updated, finished, error = values
    if state is None:  # the index names a job whose hash is gone
        return None
    try:
        model_name = json.loads(model) if model is not None else None
    except ValueError:
        model_name = model.decode(errors="replace")
    created_t, finished_t = _float(created), _float(finished)
    state_s = state.decode()
    end = finished_t if finished_t is not None else (None if state_s in TERMINAL else now)
    error_s = error.decode(errors="replace") if error else None
    return {
        "id": job_id,
        "state": state_s,
        "model": model_name,
        "created": created_t,
        "updated": _float(updated),
        "finished": finished_t,
        "duration_s": round(end - created_t, 3) if end is not None and created_t is not None else None,
        "error": error_s,
        "error_summary": summarize_error(error_s),
    }


def summarize_error(error: str | None, limit: int = ERROR_SUMMARY_CHARS) -> str | None:
    """The first line of an error, cut to limit characters."""
    if not error:
        return None
    first = error.strip().splitlines()[0] if error.strip() else ""
    return first if len(first) <= limit else first[: limit - 1] + "…"


def normalize_state(state: str | None) -> str | None:
    if state is None:
        return None
    upper = state.strip().upper()
    if upper not in STATES:
        raise UserInputError(f"--state must be one of {', '.join(STATES)} (any case), not {state!r}")
    return upper


def jobs_report(jobs: JobStore, *, state: str | None = None, model: str | None = None,
                limit: int = 20, page: int = 200) -> list[dict[str, Any]]:
    """The newest jobs first, filtered by state and model name, at most ``limit``.

    Reads the index in pages and only the few fields a listing needs (one pipeline per page),
    so filtering a long history does not load every job's spec.
    """
    if limit < 1:
        return []
    wanted_state = normalize_state(state)
    client = jobs.redis
    rows: list[dict[str, Any]] = []
    start = 0
    now = time.time()
    while len(rows) < limit:
        ids = [j.decode() for j in client.zrevrange(INDEX, start, start + page - 1)]
        if not ids:
            break
        with client.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(PREFIX + job_id, _JOB_FIELDS)
            replies = pipe.execute()
        for job_id, values in zip(ids, replies, strict=True):
            row = _job_row(job_id, values, now)
            if row is None:
                continue
            if wanted_state and row["state"] != wanted_state:
                continue
            if model and row["model"] != model:
                continue
            rows.append(row)
            if len(rows) >= limit:
                break
        start += page
    return rows
