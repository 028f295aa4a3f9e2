"""The worker's Prometheus metrics and the functions stage code records them with.

Recording is called from stage code in the pool's child processes. Every metric is labelled, so
its per-label values are created on first use, after ``worker.metrics.server`` switched
prometheus_client to multiprocess mode in the main process; without a metrics port they are
plain in-process values and recording costs next to nothing.

Metrics:

* ``modelyard_stage_duration_seconds{stage,variant,pool,cached,outcome}`` (histogram): wall time
  of one stage task. ``cached`` is ``true`` when every step it looked up was already computed,
  ``false`` when it computed one, ``none`` for stages without steps (select, deploy).
  ``outcome`` is done | failed | cancelled | timeout.
* ``modelyard_step_cache_lookups_total{stage,variant,result}``: result hit | miss.
* ``modelyard_artifact_bytes_total{direction}``: bytes uploaded to / downloaded from the artifact
  store (blobs skipped because the store already had them are not counted). Fed by the store's
  ``on_transfer`` hook, which ``worker.context`` sets to ``bytes_moved``.
* ``modelyard_jobs_finished_total{state}``: jobs this worker moved to SUCCEEDED or FAILED (a
  cancelled job is moved by the producer, not counted here).

The queue gauges are read at scrape time: see ``worker.metrics.server``.
"""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType

from prometheus_client import Counter, Histogram

log = logging.getLogger("modelyard.metrics")

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

_local = threading.local()  # per task thread: the cache lookups of the running stage


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
    """Bytes uploaded to or downloaded from the artifact store (an ``ArtifactStore.on_transfer`` hook)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    if n > 0:
        ARTIFACT_BYTES.labels(direction).inc(n)


def job_finished(state: str) -> None:
    """A job reached a final state (count it once: where the state change succeeded)."""
    JOBS_FINISHED.labels(state).inc()


class track_stage:
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

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
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


def _outcome_of(exc_type: type[BaseException]) -> str:
    # By class name: the stage's own exceptions (worker.context.JobCancelled) and Celery's are
    # recognised without importing the modules that define them.
    names = {cls.__name__ for cls in exc_type.__mro__}
    if "JobCancelled" in names or "Ignore" in names:
        return "cancelled"
    if "SoftTimeLimitExceeded" in names or "TimeLimitExceeded" in names:
        return "timeout"
    return "failed"
