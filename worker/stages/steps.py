"""Run a step once: return its manifest if the step key already has one, else compute it.

Computing happens in a per-task temporary folder; outputs are uploaded by content and the
manifest is written last. A Redis lease on the step key keeps two workers from computing the
same step at once (a redelivered message while the first copy still runs); the lease is
renewed in the background while the step runs and expires by itself if the worker dies.

A cached manifest is used only after ``touch`` marked it as just used: ``modelyard gc`` deletes
an object only if it is unchanged since its listing, so either the sweep leaves the manifest
(and its files) alone, or it deleted it first and the step is computed again.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from shared.errors import TransientError
from shared.manifest import Manifest, manifest_key, step_key
from worker import metrics
from worker.context import StageContext


@dataclass
class StepOutput:
    folder: Path  # every file under it is uploaded
    metrics: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def tool_versions(packages: tuple[str, ...]) -> dict[str, str]:
    versions = {"modelyard": _version("modelyard")}
    for name in packages:
        versions[name] = _version(name)
    return versions


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


class Lease:
    """A held step lease; ``ensure_held`` asks Redis that it still is before an irreversible act."""

    def __init__(self, lock, key: str) -> None:
        self._lock, self.key = lock, key

    def ensure_held(self) -> None:
        try:
            held = self._lock.owned()
        except Exception as exc:  # Redis unreachable: we cannot know, so we must not act
            raise TransientError(f"step lease {self.key[:12]}: cannot confirm it is still held ({exc})") from None
        if not held:
            raise TransientError(f"step lease {self.key[:12]} was lost (expired while this worker was stalled); "
                                 "another worker may be running this step")


@contextmanager
def step_lease(ctx: StageContext, key: str) -> Iterator[Lease]:
    """Hold ``modelyard:lease:<key>`` while computing; wait while another worker holds it."""
    ttl = ctx.settings.lease_ttl_s
    lock = ctx.jobs.redis.lock(f"modelyard:lease:{key}", timeout=ttl, sleep=0.5, thread_local=False)
    deadline = time.monotonic() + ctx.settings.stage_time_limit_s
    while not lock.acquire(blocking=True, blocking_timeout=ttl):
        if time.monotonic() > deadline:
            raise TransientError(f"step {key[:12]} is held by another worker for too long")
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl / 3):
            try:
                lock.reacquire()
            except Exception:  # lost the lease (expired): the step may run twice, its result is the same
                return

    renewer = threading.Thread(target=renew, name=f"lease-{key[:8]}", daemon=True)
    renewer.start()
    try:
        yield Lease(lock, key)
    finally:
        stop.set()
        renewer.join(timeout=5)
        try:
            lock.release()
        except Exception:
            pass


def run_step(
    ctx: StageContext,
    *,
    stage: str,
    input_digest: str,
    params: dict[str, Any],
    tools: dict[str, str],
    compute: Callable[[Path], StepOutput],
) -> tuple[Manifest, bool]:
    """The step's manifest and whether it came from the cache."""
    key = step_key(stage=stage, input_digest=input_digest, params=params, tools=tools)
    cached = ctx.load_manifest(key)
    if cached is not None and ctx.store.touch(manifest_key(key)):
        metrics.cache_lookup(stage, hit=True)
        return cached, True
    with step_lease(ctx, key):
        cached = ctx.load_manifest(key)  # computed by whoever held the lease before us
        if cached is not None and ctx.store.touch(manifest_key(key)):
            metrics.cache_lookup(stage, hit=True)
            return cached, True
        metrics.cache_lookup(stage, hit=False)
        with tempfile.TemporaryDirectory(prefix=f"modelyard-{stage.replace(':', '-')}-") as tmp:
            started = time.perf_counter()
            output = compute(Path(tmp))
            seconds = time.perf_counter() - started
            files = ctx.store.put_dir(output.folder)
        manifest = Manifest(
            step_key=key,
            stage=stage,
            input_digest=input_digest,
            params=params,
            tools=tools,
            files=files,
            metrics={**output.metrics, "seconds": round(seconds, 3)},
            info=output.info,
            job_id=ctx.job_id,
            worker=ctx.worker,
        )
        ctx.save_manifest(manifest)
        return manifest, False
