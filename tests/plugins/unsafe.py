"""Test-only converters that misbehave as a model running code at load time would; for the sandbox's tests.

Loaded by workers and producers started with ``MODELYARD_PLUGIN_MODULES=tests.plugins.unsafe``.

``unsafe-onnx`` attacks the worker and reports what it got.
The job's source is a folder holding ``model.onnx`` and ``attack.json``, written by the test::

    {"home_marker": "/root/.marker", "outside_marker": "/srv/x/marker", "stack_file": "...",
     "credentials": "...", "redis": ["127.0.0.1", 6379], "fork_seconds": 3}

The converter tries, in order: write ``home_marker`` (a file in the worker's home) and
``outside_marker`` (a folder outside its scratch); read the stack file and the credentials
file; connect to Redis; read its environment; fork-bomb for ``fork_seconds`` (a bounded tree:
each process forks up to FANOUT children, DEPTH levels deep, and every process exits by itself
at the deadline). It then fails the job with one line that reports every attempt,
``name=blocked (...)`` or ``name=SUCCEEDED: <what it got>``: the test reads it from the job's
error, and a leak would show there too (the secret's bytes in the job record).

``misbehaving-onnx`` does one bad thing, named by ``behaviour.json`` in its source folder
(``{"action": "memory"}``): ``memory`` (allocate 4 GB), ``cpu`` (spin), ``file`` (write 64 MB
into one file), ``abort`` (``os.abort``, as a crashing C extension), ``hang`` (sleep 600 s),
``procs`` (fork up to 2000 sleeping children), ``user-error`` (a UserInputError), ``symlink`` (convert, but
leave a symlink to ``target`` in the workdir) or ``none`` (convert).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from shared.errors import UserInputError
from worker.plugins.base import ConvertRequest, ConvertResult
from worker.plugins.onnx_passthrough import OnnxPassthrough

PLAN, BEHAVIOUR = "attack.json", "behaviour.json"
FANOUT, DEPTH = 6, 4  # at most 6 + 36 + 216 + 1296 forks: bounded even where nothing limits processes
SECRET_ENV_WORDS = ("MODELYARD", "REDIS", "GOOGLE", "PASSWORD", "SECRET", "TOKEN", "AWS")


class UnsafeOnnx(OnnxPassthrough):
    name = "unsafe-onnx"

    def convert(self, request: ConvertRequest) -> ConvertResult:
        plan = json.loads((Path(request.source) / PLAN).read_text())
        outcomes = {
            "home": _write(plan["home_marker"]),
            "outside": _write(plan["outside_marker"]),
            "stack": _read(plan["stack_file"]),
            "credentials": _read(plan["credentials"]),
            "redis": _connect(*plan["redis"]),
            "env": _environment(),
            "fork": _fork_bomb(float(plan.get("fork_seconds", 3))),
        }
        raise UserInputError("unsafe-onnx attempts: " + "; ".join(f"{k}={v}" for k, v in outcomes.items()))


class MisbehavingOnnx(OnnxPassthrough):
    name = "misbehaving-onnx"

    def convert(self, request: ConvertRequest) -> ConvertResult:
        plan = json.loads((Path(request.source) / BEHAVIOUR).read_text())
        action = plan["action"]
        if action == "memory":
            hoard = [bytearray(2**28) for _ in range(16)]  # 4 GB, every page touched by bytearray's zeroing
            raise AssertionError(f"allocated {len(hoard)} x 256 MB")
        if action == "cpu":
            deadline = time.monotonic() + 120  # bounded even unsandboxed
            while time.monotonic() < deadline:
                pass
        if action == "file":
            with open(Path(request.workdir) / "big.bin", "wb") as handle:
                for _ in range(64):
                    handle.write(b"\0" * 2**20)
        elif action == "abort":
            os.abort()
        elif action == "hang":
            time.sleep(600)
        elif action == "procs":
            for _ in range(2000):  # bounded even unsandboxed; the sandbox refuses far sooner
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
        elif action == "user-error":
            raise UserInputError("model.source: misbehaving-onnx refuses this model, as asked")
        result = super().convert(request)
        if action == "symlink":
            (Path(request.workdir) / "weights.bin").symlink_to(plan["target"])
        return result


def _write(path: str) -> str:
    try:
        Path(path).write_text("written from a model load")
    except OSError as exc:
        return f"blocked ({type(exc).__name__}: {exc.strerror})"
    return f"SUCCEEDED: wrote {path}"


def _read(path: str) -> str:
    try:
        return f"SUCCEEDED: {Path(path).read_text()!r}"
    except OSError as exc:
        return f"blocked ({type(exc).__name__}: {exc.strerror})"


def _connect(host: str, port: int) -> str:
    try:
        with socket.create_connection((host, int(port)), timeout=3) as sock:
            sock.sendall(b"PING\r\n")
            return f"SUCCEEDED: connected, Redis said {sock.recv(64)!r}"
    except OSError as exc:
        return f"blocked ({type(exc).__name__})"


def _environment() -> str:
    leaked = {k: v for k, v in os.environ.items()
              if any(word in k.upper() for word in SECRET_ENV_WORDS) and k != "MODELYARD_PLUGIN_MODULES"}
    return f"SUCCEEDED: {leaked!r}" if leaked else "blocked (no secret-looking variables)"


def _fork_bomb(seconds: float) -> str:
    """Fork a bounded tree until the deadline; how many processes started and how many forks were refused."""
    deadline = time.monotonic() + seconds
    read_end, write_end = os.pipe()
    _spread(DEPTH, deadline, write_end)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:  # one byte per fork: x started, r refused; EOF once all exited
        report = pipe.read()
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    started, refused = report.count(b"x"), report.count(b"r")
    if refused:
        return f"blocked (started {started} processes, {refused} forks refused)"
    return f"SUCCEEDED: started {started} processes, none refused"


def _spread(depth: int, deadline: float, pipe: int) -> None:
    """Fork up to FANOUT children, each spreading one level less; every process exits at the deadline."""
    for _ in range(FANOUT if depth > 0 else 0):
        try:
            pid = os.fork()
        except OSError:
            os.write(pipe, b"r")
            continue
        if pid == 0:
            os.write(pipe, b"x")
            _spread(depth - 1, deadline, pipe)
            time.sleep(max(0.0, deadline - time.monotonic()))
            os._exit(0)
