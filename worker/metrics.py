"""Prometheus metrics of a worker, served at ``http://<host>:<port>/metrics``.

Enabled by ``MODELYARD_METRICS_PORT`` (unset or 0: disabled, and every function here is a cheap
in-process no-op). Celery's prefork pool runs stages in child processes, so the metrics use
prometheus_client's multiprocess mode: each child writes its samples to memory-mapped files in a
folder private to this worker (``PROMETHEUS_MULTIPROC_DIR``), and the worker's main process serves
the sum over all children, living and dead, from one HTTP server (started on ``worker_ready``,
after the pool exists). Children replaced by ``--max-tasks-per-child`` keep their counts.

Ports: a worker serves on ``MODELYARD_METRICS_PORT`` when it is free, else on the next free one
of ``base+1 … base+63`` (so the n-th worker started on one host gets ``base+n-1``); the port is
logged ("metrics on http://…"). In Kubernetes there is one worker per pod and the port is the base.
``MODELYARD_METRICS_ADDR`` is the listen address (default ``0.0.0.0``). The folder is a fresh
temporary one under ``MODELYARD_METRICS_DIR`` (default: the system temp folder), removed at
shutdown; a ``PROMETHEUS_MULTIPROC_DIR`` set by the caller is used instead (and emptied at start:
it must belong to this worker alone).

Metrics:

* ``modelyard_stage_duration_seconds{stage,variant,pool,cached,outcome}`` (histogram): wall time
  of one stage task. ``cached`` is ``true`` when every step it looked up was already computed,
  ``false`` when it computed one, ``none`` for stages without steps (select, deploy).
  ``outcome`` is done | failed | cancelled | timeout.
* ``modelyard_step_cache_lookups_total{stage,variant,result}``: result hit | miss.
* ``modelyard_artifact_bytes_total{direction}``: bytes uploaded to / downloaded from the artifact
  store (blobs skipped because the store already had them are not counted).
* ``modelyard_jobs_finished_total{state}``: jobs this worker moved to SUCCEEDED or FAILED (a
  cancelled job is moved by the producer, not counted here).
* ``modelyard_queue_depth{queue}``, ``modelyard_queue_unacked{queue}``, ``modelyard_broker_up``:
  read from Redis at scrape time by the main process. Every worker reports the same values:
  aggregate with ``max by (queue)``.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Any

from celery import signals
from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess, start_http_server, values
from prometheus_client.core import GaugeMetricFamily

from shared.celery_app import QUEUES

log = logging.getLogger("modelyard.metrics")

PORT_ENV = "MODELYARD_METRICS_PORT"
ADDR_ENV = "MODELYARD_METRICS_ADDR"
DIR_ENV = "MODELYARD_METRICS_DIR"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PORT_SPAN = 64

# Stages run from milliseconds (a cache hit) to the hard time limit (3600 s).
STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 2700, 3600, float("inf"))

STAGE_SECONDS = Histogram(
    "modelyard_stage_duration_seconds", "Wall time of one stage task.",
    ["stage", "variant", "pool", "cached", "outcome"], buckets=STAGE_BUCKETS,
)
CACHE_LOOKUPS = Counter(
    "modelyard_step_cache_lookups", "Step manifests looked up: hit (already computed) or miss (computed).",
    ["stage", "variant", "result"],
)
ARTIFACT_BYTES = Counter(
    "modelyard_artifact_bytes", "Bytes moved between this worker and the artifact store.", ["direction"],
)
JOBS_FINISHED = Counter(
    "modelyard_jobs_finished", "Jobs that reached a final state in a stage of this worker.", ["state"],
)

DIRECTIONS = ("uploaded", "downloaded")


class _State:
    enabled = False
    folder: str | None = None
    created_folder = False
    server: Any = None
    port: int | None = None


_state = _State()
_local = threading.local()  # per task thread: the cache lookups of the running stage


def configured_port(environ: dict | None = None) -> int:
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


# -- recording (called from the stage code, in the pool's child processes) -----------------------
def _split(stage: str, variant: str | None = None) -> tuple[str, str]:
    name, _, suffix = stage.partition(":")
    return name, variant if variant is not None else suffix


def observe_stage(stage: str, variant: str | None, pool: str, seconds: float, cached: bool | None = None,
                  outcome: str = "done") -> None:
    """Record one stage task's duration. ``stage`` may carry the variant (``optimize:int8``)."""
    name, variant = _split(stage, variant)
    label = "none" if cached is None else "true" if cached else "false"
    STAGE_SECONDS.labels(name, variant or "", pool or "", label, outcome).observe(max(0.0, seconds))


def cache_lookup(stage: str, hit: bool) -> None:
    """A step's manifest was looked up: hit (already computed somewhere) or miss (computed now)."""
    name, variant = _split(stage)
    CACHE_LOOKUPS.labels(name, variant, "hit" if hit else "miss").inc()
    lookups = getattr(_local, "lookups", None)
    if lookups is not None:
        lookups.append(hit)


def bytes_moved(direction: str, n: int) -> None:
    """Bytes uploaded to or downloaded from the artifact store."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    if n > 0:
        ARTIFACT_BYTES.labels(direction).inc(n)


def job_finished(state: str) -> None:
    """A job reached a final state (count it once: where the state change succeeded)."""
    JOBS_FINISHED.labels(state).inc()


class track_stage:  # noqa: N801 - used as a context manager, reads like a function
    """Time a stage task and record it on exit: ``with track_stage("optimize:int8", "gpu") as t:``.

    The outcome is ``done`` on a normal exit unless ``t.outcome`` was set (e.g. "failed" for a
    variant that returned its error), ``cancelled`` for a cancelled job, ``timeout`` for the soft
    time limit, ``failed`` for any other exception. ``cached`` comes from the cache_lookup calls
    made while the block ran.
    """

    def __init__(self, stage: str, pool: str, variant: str | None = None) -> None:
        self.stage, self.pool, self.variant = stage, pool, variant
        self.outcome: str | None = None
        self.seconds: float | None = None

    def __enter__(self) -> track_stage:
        self._outer = getattr(_local, "lookups", None)
        _local.lookups = []
        self._started = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.seconds = time.perf_counter() - self._started
        lookups, _local.lookups = _local.lookups, self._outer
        if exc_type is None:
            outcome = self.outcome or "done"
        else:
            outcome = _outcome_of(exc_type)
        cached = None if not lookups else all(lookups)
        try:
            observe_stage(self.stage, self.variant, self.pool, self.seconds, cached, outcome)
        except Exception:  # metrics never fail a stage
            log.exception("could not record stage metrics")


def _outcome_of(exc_type: type) -> str:
    names = {cls.__name__ for cls in exc_type.__mro__}
    if "JobCancelled" in names or "Ignore" in names:
        return "cancelled"
    if "SoftTimeLimitExceeded" in names or "TimeLimitExceeded" in names:
        return "timeout"
    return "failed"


def instrument_store(store):
    """Count the bytes a store instance moves (its ``_upload`` / ``_download``); returns the store.

    Wraps the two raw transfer methods of this one instance, which every blob, folder and object
    transfer goes through; blobs that ``put_file`` finds already stored are not uploaded, so not
    counted. Idempotent.
    """
    if getattr(store, "_modelyard_metered", False):
        return store
    upload, download = store._upload, store._download

    def _upload(key, source):
        upload(key, source)
        try:
            bytes_moved("uploaded", os.path.getsize(source))
        except OSError:
            pass

    def _download(key, dest):
        download(key, dest)
        try:
            bytes_moved("downloaded", os.path.getsize(dest))
        except OSError:
            pass

    store._upload, store._download = _upload, _download
    store._modelyard_metered = True
    return store


# -- queue depth, read at scrape time ------------------------------------------------------------
class QueueCollector:
    """Queue depth and unacked count per queue, read from the broker's Redis on each scrape."""

    def __init__(self, broker_url: str, transport_options: dict | None = None, queues=QUEUES,
                 timeout: float = 3.0) -> None:
        self.broker_url = broker_url
        self.transport_options = dict(transport_options or {})
        self.queues = tuple(queues)
        self.timeout = timeout
        self._client = None
        self._lock = threading.Lock()

    def _redis(self):
        if self._client is None:
            from producer.operations import redis_client

            self._client = redis_client(self.broker_url, socket_timeout=self.timeout)
        return self._client

    def collect(self):
        from producer.operations import queue_depth, unacked_counts

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


# -- lifecycle: Celery signals of the worker's main process --------------------------------------
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


@signals.worker_init.connect
def _on_worker_init(sender=None, **_kwargs) -> None:
    try:
        if configured_port():
            folder = enable_multiprocess()
            log.debug("metrics: multiprocess folder %s", folder)
    except Exception:
        log.exception("metrics disabled: could not set up %s", MULTIPROC_ENV)
        _state.enabled = False


@signals.worker_ready.connect
def _on_worker_ready(sender=None, **_kwargs) -> None:
    if not _state.enabled:
        return
    try:
        app = getattr(sender, "app", None)
        conf = app.conf if app is not None else None
        registry = make_registry(conf.broker_url if conf else None,
                                 dict(conf.broker_transport_options or {}) if conf else None)
        addr = os.environ.get(ADDR_ENV) or "0.0.0.0"
        port = serve(registry, configured_port(), addr)
        log.info("metrics on http://%s:%d/metrics", addr, port)
    except Exception:
        log.exception("metrics: could not start the HTTP server")


@signals.worker_process_shutdown.connect
def _on_process_shutdown(pid=None, **_kwargs) -> None:
    if _state.enabled:
        try:
            multiprocess.mark_process_dead(pid or os.getpid())
        except Exception:
            pass


@signals.worker_shutdown.connect
def _on_worker_shutdown(sender=None, **_kwargs) -> None:
    if _state.server is not None:
        try:
            _state.server.shutdown()
            _state.server.server_close()
        except Exception:
            pass
        _state.server, _state.port = None, None
    if _state.created_folder and _state.folder:
        shutil.rmtree(_state.folder, ignore_errors=True)
        _state.created_folder = False
