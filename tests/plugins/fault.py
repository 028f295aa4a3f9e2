"""A test-only converter, ``fault-onnx``: the ONNX passthrough with a fault injected on purpose.

Loaded by workers and producers started with ``MODELYARD_PLUGIN_MODULES=tests.plugins.fault``.
The job's source is a folder holding ``model.onnx`` and ``fault.json``::

    {"action": "sleep", "seconds": 5, "times": 1}

``action`` is one of ``none``, ``sleep`` (then convert), ``hang`` (sleep through the soft time
limit, as a stuck C extension would), ``kill`` (SIGKILL to its own process), ``abort``
(``os.abort``, like a segfault), ``memory`` (raise ``MemoryError``), ``allocate`` (touch
``megabytes`` of memory, 16 MiB at a time, as a loader that inflates a model would: under a
memory cgroup the kernel's OOM killer ends the process before Python sees an error) or ``write``
(write ``megabytes`` of padding into the converter's output folder, ``padding.bin``, as a
converter with a large output does; it becomes part of the converted model's files).
``times`` limits the fault to the first N executions of this model (null: every execution).

Every execution start is appended to the Redis list ``modelyard:test:fault-runs:<model name>``
before the fault, so a test counts how many times the stage really ran.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

from shared.broker import redis_client
from shared.errors import UserInputError
from shared.settings import get_settings
from worker.plugins.base import ConvertRequest, ConvertResult
from worker.plugins.onnx_passthrough import OnnxPassthrough

RUNS = "modelyard:test:fault-runs:"
PLAN = "fault.json"
PADDING = "padding.bin"
CHUNK_MB = 16


def runs_key(model_name: str) -> str:
    return RUNS + model_name


def record_start(model_name: str) -> int:
    """Append this execution to the model's run list; returns its 1-based number."""
    client = redis_client(get_settings().resolved_broker_url())
    entry = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    try:
        return int(client.rpush(runs_key(model_name), json.dumps(entry)))
    finally:
        client.close()


def _hang(seconds: float) -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            time.sleep(0.2)
        except SoftTimeLimitExceeded:
            continue  # deaf to the soft limit: only the hard limit ends it


def _allocate(megabytes: int) -> None:
    """Hold ``megabytes`` of memory whose every page is written (so it is resident, not just reserved)."""
    held = [b"\x01" * CHUNK_MB * 2**20 for _ in range(max(1, megabytes // CHUNK_MB))]
    del held  # only reached without a limit that stops it


def _write(path: Path, megabytes: int) -> None:
    block = b"\x00" * 2**20
    with open(path, "wb") as out:
        for _ in range(megabytes):
            out.write(block)
            out.flush()  # reach the disk now: ENOSPC from this write, not from a later close


class FaultOnnx(OnnxPassthrough):
    name = "fault-onnx"
    sandboxed = False  # its faults must hit the worker process itself, and it reports to Redis

    def convert(self, request: ConvertRequest) -> ConvertResult:
        folder = Path(request.source)
        if not (folder / PLAN).is_file():
            raise UserInputError(f"model.source {request.model.source}: fault-onnx needs a folder with {PLAN}")
        plan = json.loads((folder / PLAN).read_text())
        number = record_start(request.model.name)
        times = plan.get("times")
        if times is None or number <= times:
            self._inject(plan, Path(request.workdir))
        return super().convert(request)

    @staticmethod
    def _inject(plan: dict, workdir: Path) -> None:
        action = plan.get("action", "none")
        if action == "sleep":
            time.sleep(float(plan.get("seconds", 1)))
        elif action == "hang":
            _hang(float(plan.get("seconds", 60)))
        elif action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "abort":
            os.abort()
        elif action == "memory":
            raise MemoryError("fault-onnx: simulated out-of-memory")
        elif action == "allocate":
            _allocate(int(plan.get("megabytes", 4096)))
        elif action == "write":
            _write(workdir / PADDING, int(plan.get("megabytes", 16)))
        elif action != "none":
            raise ValueError(f"fault-onnx: unknown action {action!r}")
