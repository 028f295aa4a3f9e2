"""Serving the worker's metrics at ``http://<host>:<port>/metrics``, summed over its pool.

Enabled by ``MODELYARD_METRICS_PORT`` (unset or 0: disabled, and recording is a cheap in-process
no-op). Celery's prefork pool runs stages in child processes, so the metrics use
prometheus_client's multiprocess mode: each child writes its samples to memory-mapped files in a
folder private to this worker (``PROMETHEUS_MULTIPROC_DIR``), and the worker's main process serves
the sum over all children, living and dead, from one HTTP server (started on ``worker_ready``,
after the pool exists: see ``worker.metrics.signals``). Children replaced by
``--max-tasks-per-child`` keep their counts.

Ports: a worker serves on ``MODELYARD_METRICS_PORT`` when it is free, else on the next free one
of ``base+1 … base+63`` (so the n-th worker started on one host gets ``base+n-1``); the port is
logged ("metrics on http://…"). In Kubernetes there is one worker per pod and the port is the base.
``MODELYARD_METRICS_ADDR`` is the listen address (default ``0.0.0.0``). The folder is a fresh
temporary one under ``MODELYARD_METRICS_DIR`` (default: the system temp folder), removed at
shutdown; a ``PROMETHEUS_MULTIPROC_DIR`` set by the caller is used instead (and emptied at start:
it must belong to this worker alone).

Besides the recorded metrics (``worker.metrics.instruments``) the main process reads, at scrape
time, ``modelyard_queue_depth{queue}``, ``modelyard_queue_unacked{queue}`` and
``modelyard_broker_up`` from the broker's Redis. Every worker reports the same values: aggregate
with ``max by (queue)``.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import redis
from prometheus_client import CollectorRegistry, multiprocess, start_http_server, values
from prometheus_client.core import GaugeMetricFamily, Metric

from shared.broker import redis_client
from shared.celery_app import QUEUES
from shared.queues import queue_depth, unacked_counts

log = logging.getLogger("modelyard.metrics")

PORT_ENV = "MODELYARD_METRICS_PORT"
ADDR_ENV = "MODELYARD_METRICS_ADDR"
DIR_ENV = "MODELYARD_METRICS_DIR"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PORT_SPAN = 64


class _State:
    """What the main process set up, for shutdown to undo."""

    enabled = False
    folder: str | None = None
    created_folder = False
    server: Any = None
    port: int | None = None


_state = _State()


def configured_port(environ: dict[str, str] | None = None) -> int:
    """The base port from MODELYARD_METRICS_PORT; 0 when unset, empty or 0 (disabled)."""
    raw = (environ if environ is not None else os.environ).get(PORT_ENV, "").strip()
    if not raw:
        return 0
    try:
        port = int(raw)
    except ValueError:
        raise ValueError(f"{PORT_ENV} must be a port number, not {raw!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{PORT_ENV} must be between 0 and 65535, not {port}")
    return port


def serving_port() -> int | None:
    """The port this worker's main process serves metrics on (None when not serving)."""
    return _state.port


def enabled() -> bool:
    """Whether multiprocess mode was set up in this worker (the server should start)."""
    return _state.enabled


class QueueCollector:
    """Queue depth and unacked count per queue, read from the broker's Redis on each scrape."""

    def __init__(self, broker_url: str, transport_options: dict | None = None,
                 queues: Iterable[str] = QUEUES, timeout: float = 3.0) -> None:
        self.broker_url = broker_url
        self.transport_options = dict(transport_options or {})
        self.queues = tuple(queues)
        self.timeout = timeout
        self._client: redis.Redis | None = None
        self._lock = threading.Lock()

    def _redis(self) -> redis.Redis:
        if self._client is None:
            self._client = redis_client(self.broker_url, socket_connect_timeout=5, socket_timeout=self.timeout)
        return self._client

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("modelyard_queue_depth", "Messages waiting in the queue (all priorities).",
                                  labels=["queue"])
        unacked = GaugeMetricFamily("modelyard_queue_unacked",
                                    "Messages reserved by workers and not yet acknowledged (running stages).",
                                    labels=["queue"])
        up = GaugeMetricFamily("modelyard_broker_up", "1 when the broker's Redis answered this scrape.")
        try:
            with self._lock:
                client = self._redis()
                depths = {q: queue_depth(client, q, self.transport_options) for q in self.queues}
                reserved = unacked_counts(client, self.queues, self.transport_options)
        except Exception as exc:  # a scrape must not fail because Redis is away
            log.warning("metrics: cannot read queue depths: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        for queue in self.queues:
            depth.add_metric([queue], depths[queue])
            unacked.add_metric([queue], reserved.get(queue, 0))
        up.add_metric([], 1)
        yield depth
        yield unacked
        yield up


def enable_multiprocess() -> str:
    """Point prometheus_client at a private multiprocess folder; call before the pool forks."""
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        os.makedirs(given, exist_ok=True)
        for stale in glob.glob(os.path.join(given, "*.db")):  # a previous run's children
            os.remove(stale)
        folder, created = given, False
    else:
        base = os.environ.get(DIR_ENV) or None
        if base:
            os.makedirs(base, exist_ok=True)
        folder, created = tempfile.mkdtemp(prefix="modelyard-metrics-", dir=base), True
        os.environ[MULTIPROC_ENV] = folder
    # prometheus_client picks its value class when first imported; metric children created from
    # now on (all of ours are labelled, so created on first use, in the pool's children) use files.
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()
    _state.enabled, _state.folder, _state.created_folder = True, folder, created
    return folder


def disable() -> None:
    """Forget a failed setup: the server will not start."""
    _state.enabled = False


def make_registry(broker_url: str | None, transport_options: dict | None = None) -> CollectorRegistry:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    if broker_url:
        registry.register(QueueCollector(broker_url, transport_options))
    return registry


def serve(registry: CollectorRegistry, base_port: int, addr: str = "0.0.0.0") -> int:
    """Start the HTTP server on the first free port of base_port … base_port+63; returns it."""
    last: OSError | None = None
    for port in range(base_port, min(base_port + PORT_SPAN, 65536)):
        try:
            server, _thread = start_http_server(port, addr=addr, registry=registry)
        except OSError as exc:
            last = exc
            continue
        _state.server, _state.port = server, port
        return port
    raise OSError(f"no free port for metrics in {base_port}..{base_port + PORT_SPAN - 1}: {last}")


def start(broker_url: str | None, transport_options: dict | None = None) -> tuple[str, int]:
    """Serve this worker's metrics (and its broker's queue gauges); returns (address, port)."""
    registry = make_registry(broker_url, transport_options)
    addr = os.environ.get(ADDR_ENV) or "0.0.0.0"
    return addr, serve(registry, configured_port(), addr)


def mark_process_dead(pid: int) -> None:
    """A pool child exited: its live gauges stop counting (its counters and histograms stay)."""
    if _state.enabled:
        multiprocess.mark_process_dead(pid)


def stop() -> None:
    """Stop the HTTP server and remove the multiprocess folder this worker created."""
    if _state.server is not None:
        try:
            _state.server.shutdown()
            _state.server.server_close()
        except Exception:
            log.debug("metrics: the HTTP server did not close cleanly", exc_info=True)
        _state.server, _state.port = None, None
    if _state.created_folder and _state.folder:
        shutil.rmtree(_state.folder, ignore_errors=True)
        _state.created_folder = False
