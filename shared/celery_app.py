"""The Celery app factory: one place for broker, routing and delivery settings.

Delivery is at-least-once: a message is acknowledged only after its stage finished
(``acks_late``), returned to the queue if the worker process died (``reject_on_worker_lost``),
and each worker process reserves one message at a time (prefetch 1). Redis redelivers an
unacknowledged message after the visibility timeout, which is kept above the hard time limit
of a stage so that a running stage is never delivered twice. Only JSON crosses the wire.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from shared.errors import UserInputError
from shared.settings import Settings

QUEUES = ("cpu", "gpu")


def delivery_config(settings: Settings, broker_url: str) -> dict:
    return {
        "broker_url": broker_url,
        "result_backend": broker_url,
        "task_serializer": "json",
        "result_serializer": "json",
        # Nothing reads a stage's Celery result: chain steps get their input in the message, job
        # state lives in the JobStore. Only the optimize variants of a chord header store theirs
        # (shared.pipeline.build_chain sets ignore_result=False on them) so the chord can join.
        "task_ignore_result": True,
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.stage_time_limit_s,
        "task_soft_time_limit": settings.stage_soft_time_limit_s,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            "socket_timeout": 30,
            "socket_connect_timeout": 5,
            "health_check_interval": 10,
            "retry_on_timeout": True,
        },
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "task_default_queue": "cpu",
        "task_queues": [Queue(name) for name in QUEUES],
        # Besides the pools, each worker consumes its hardware-class queue "<pool>.<class>" (cpu.cpu-avx2),
        # which a job's optimize.target names: an open set, declared by whoever uses one first.
        "task_create_missing_queues": True,
        # No STARTED write to the result backend (a GET and a SET + PUBLISH per task): nothing reads a
        # task's Celery state (the job record says what runs), and Flower sees task-started events.
        "task_track_started": False,
        # Task events cost the worker's main process a publish per event (3 per task): sent only
        # while a monitor asked for them (Flower broadcasts enable_events every 5 s) unless
        # MODELYARD_TASK_EVENTS=true. Worker heartbeats, which show workers online, are always sent.
        "task_send_sent_event": settings.task_events,
        "worker_send_task_events": settings.task_events,
        "result_extended": True,
        "result_expires": 7 * 24 * 3600,
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "broker_channel_error_retry": True,
    }


def make_celery(settings: Settings, *, broker_url: str | None = None) -> Celery:
    url = broker_url or settings.resolved_broker_url()
    if not url:
        raise UserInputError(
            "no broker configured: set MODELYARD_BROKER_URL (e.g. redis://:password@host:6379/0) "
            "or start the local stack with 'modelyard up'"
        )
    app = Celery("modelyard")
    app.conf.update(delivery_config(settings, with_tls_defaults(url)))
    return app


def with_tls_defaults(url: str) -> str:
    """A ``rediss://`` URL that does not say otherwise verifies the server's certificate.

    Celery's Redis result backend refuses a ``rediss://`` URL without ``ssl_cert_reqs``, and kombu
    would connect without verifying; ``ssl_cert_reqs=required`` is what redis-py does by default.
    """
    if url.startswith("rediss://") and "ssl_cert_reqs=" not in url:
        url += ("&" if "?" in url else "?") + "ssl_cert_reqs=required"
    return url
