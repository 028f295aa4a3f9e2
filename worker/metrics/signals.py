"""The Celery signals that run the metrics server's lifecycle in a worker's main process.

Connected when this module is imported; ``worker.metrics`` imports it, and ``worker.tasks``
(which the worker app autodiscovers) imports ``worker.metrics``, so every worker started with
``celery -A worker.app`` has them. Each handler logs and carries on when metrics cannot be set
up: a worker without metrics still runs its stages.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import signals

from shared.celery_app import configured_broker_url
from worker.metrics import server

log = logging.getLogger("modelyard.metrics")


@signals.worker_init.connect
def _on_worker_init(sender: Any = None, **_kwargs: Any) -> None:
    """Before the pool forks: switch to multiprocess mode when a metrics port is configured."""
    try:
        if server.configured_port():
            folder = server.enable_multiprocess()
            log.debug("metrics: multiprocess folder %s", folder)
    except Exception:
        log.exception("metrics disabled: could not set up %s", server.MULTIPROC_ENV)
        server.disable()


@signals.worker_ready.connect
def _on_worker_ready(sender: Any = None, **_kwargs: Any) -> None:
    """The pool exists: start the HTTP server in the main process."""
    if not server.enabled():
        return
    try:
        app = getattr(sender, "app", None)
        conf = app.conf if app is not None else None
        addr, port = server.start(configured_broker_url(conf) if conf else None,
                                  dict(conf.broker_transport_options or {}) if conf else None)
        log.info("metrics on http://%s:%d/metrics", addr, port)
    except Exception:
        log.exception("metrics: could not start the HTTP server")


@signals.worker_process_shutdown.connect
def _on_process_shutdown(pid: int | None = None, **_kwargs: Any) -> None:
    try:
        server.mark_process_dead(pid or os.getpid())
    except Exception:
        log.debug("metrics: could not mark process %s dead", pid, exc_info=True)


@signals.worker_shutdown.connect
def _on_worker_shutdown(sender: Any = None, **_kwargs: Any) -> None:
    server.stop()
