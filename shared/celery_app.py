"""The Celery app factory: one place for broker, routing and delivery settings.

Delivery is at-least-once: a message is acknowledged only after its stage finished
(``acks_late``), returned to the queue if the worker process died (``reject_on_worker_lost``),
and each worker process reserves one message at a time (prefetch 1). Redis redelivers an
unacknowledged message after the visibility timeout, which is kept above the hard time limit
of a stage so that a running stage is never delivered twice. Only JSON crosses the wire.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from shared.broker import celery_connection
from shared.errors import UserInputError
from shared.settings import Settings

QUEUES = ("cpu", "gpu")
# The broker URL as configured (a sentinel:// one with its master name, which Celery's form keeps in
# the transport options): what our own Redis clients open, through shared.broker.redis_client. "SECRET"
# in the name: Celery's filter_hidden_settings masks it wherever a worker's conf is shown (Flower).
CONFIGURED_URL_KEY = "modelyard_broker_url_secret"


def delivery_config(settings: Settings, broker_url: str) -> dict:
    connection = celery_connection(broker_url)  # UserInputError for a malformed sentinel URL
    return {
        "broker_url": connection.url,
        "result_backend": connection.url,
        CONFIGURED_URL_KEY: broker_url,
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
            # A partition that leaves connections open but silent costs the worker's main process one
            # socket_timeout per pooled connection it finds dead, its event loop blocked meanwhile
            # (tests/reliability/test_chaos.py): kept short, commands on a live Redis take milliseconds.
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
            "health_check_interval": 10,
            "retry_on_timeout": True,
            **connection.transport_options,
        },
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout_s,
                                             **connection.transport_options},
        **connection.settings,
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
    app.conf.update(delivery_config(settings, url))
    return app


def configured_broker_url(conf: Any) -> str:
    """The broker URL a Celery app was made with, for ``shared.broker.redis_client``.

    Falls back to ``broker_url`` when someone set that directly afterwards (``worker.local`` does).
    """
    configured = conf.get(CONFIGURED_URL_KEY)
    if configured and celery_connection(configured).url == conf.broker_url:
        return configured
    return conf.broker_url
