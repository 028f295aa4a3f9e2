"""A test-only converter, ``fault-onnx``: the ONNX passthrough with a fault injected on purpose.

Loaded by workers and producers started with ``MODELYARD_PLUGIN_MODULES=tests.plugins.fault``.
The job's source is a folder holding ``model.onnx`` and ``fault.json``::

    {"action": "sleep", "seconds": 5, "times": 1}

``action`` is one of ``none``, ``sleep`` (then convert), ``hang`` (sleep through the soft time
limit, as a stuck C extension would), ``kill`` (SIGKILL to its own process), ``abort``
(``os.abort``, like a segfault) or ``memory`` (raise ``MemoryError``). ``times`` limits the
fault to the first N executions of this model (null: every execution).

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

import redis

from shared.errors import UserInputError
from shared.settings import get_settings
from worker.plugins.base import ConvertRequest, ConvertResult
from worker.plugins.onnx_passthrough import OnnxPassthrough

RUNS = "modelyard:test:fault-runs:"
PLAN = "fault.json"


def runs_key(model_name: str) -> str:
    return RUNS + model_name


def record_start(model_name: str) -> int:
    """Append this execution to the model's run list; returns its 1-based number."""
    client = redis.Redis.from_url(get_settings().resolved_broker_url())
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
            self._inject(plan)
        return super().convert(request)

    @staticmethod
    def _inject(plan: dict) -> None:
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
        elif action != "none":
            raise ValueError(f"fault-onnx: unknown action {action!r}")
