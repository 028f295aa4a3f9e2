"""Prometheus metrics of a worker: recorded by stages, served at ``http://<host>:<port>/metrics``.

``instruments`` defines the metrics and the recording functions stage code calls
(``metrics.track_stage``, ``metrics.cache_lookup``, ``metrics.bytes_moved``,
``metrics.job_finished``); ``server`` sets up prometheus_client's multiprocess mode and serves the
sum over the pool, with queue gauges read from the broker; ``signals`` connects the server's
lifecycle to the worker's Celery signals. Importing this package connects those signals, so any
worker whose tasks record metrics also serves them.
"""

from __future__ import annotations

from worker.metrics import signals  # noqa: F401  (connects the worker lifecycle handlers)
from worker.metrics.instruments import (
    ARTIFACT_BYTES,
    CACHE_LOOKUPS,
    DIRECTIONS,
    JOBS_FINISHED,
    STAGE_BUCKETS,
    STAGE_SECONDS,
    bytes_moved,
    cache_lookup,
    job_finished,
    observe_stage,
    track_stage,
)
from worker.metrics.server import (
    ADDR_ENV,
    DIR_ENV,
    MULTIPROC_ENV,
    PORT_ENV,
    QueueCollector,
    configured_port,
    enable_multiprocess,
    make_registry,
    serve,
    serving_port,
    stop,
)

__all__ = [
    "ADDR_ENV", "ARTIFACT_BYTES", "CACHE_LOOKUPS", "DIRECTIONS", "DIR_ENV", "JOBS_FINISHED", "MULTIPROC_ENV",
    "PORT_ENV", "STAGE_BUCKETS", "STAGE_SECONDS", "QueueCollector", "bytes_moved", "cache_lookup",
    "configured_port", "enable_multiprocess", "job_finished", "make_registry", "observe_stage", "serve",
    "serving_port", "stop", "track_stage",
]
