"""The process inside the sandbox: ``python -m worker.sandbox.child IO_FOLDER [--probe]``.

In order: drop root (a root worker's sandbox starts as root; it becomes an unprivileged uid
with no capabilities before anything else), set the limits, read the request, import the
plugins, run the converter (or the named task, ``worker.sandbox.tasks``), write the result or
the error. ``--warm`` (``warm.WarmBox``): the uid and limits come from ``boot.json``; after
them the child imports the frameworks most converts need, then waits for ``request.json``.
``--probe`` stops after the limits and writes a result that says so: the worker's start-up check.

Every failure ends as an ``error.json``: a UserInputError keeps its message; a MemoryError, or a
library's complaint that names an exhausted limit, is reported as that limit; anything else is
reported with its type and message (its traceback goes to the sandbox's log, which the worker
logs). The exit status is 0 whenever a result or an error was written.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path


def drop_root(uid: int) -> None:
    """Become uid/gid ``uid`` with no supplementary groups and, as a result, no capabilities."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    status = Path("/proc/self/status").read_text()
    effective = next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:"))
    if os.getuid() == 0 or int(effective, 16) != 0:
        raise SystemExit("sandbox: could not drop root")


def main(argv: list[str]) -> int:
    io = Path(argv[0])
    warm = "--warm" in argv
    boot = json.loads((io / ("boot.json" if warm else "request.json")).read_text())
    if boot.get("drop_to_uid") is not None:
        drop_root(int(boot["drop_to_uid"]))

    from worker.sandbox import exchange
    from worker.sandbox.limits import Limits

    limits = Limits(**boot["limits"])
    limits.apply()
    if "--probe" in argv:
        (io / exchange.RESULT).write_text(json.dumps({"probe": "ok", "uid": os.getuid()}))
        return 0
    if warm:  # unprivileged and limited already: import the frameworks, then wait for the request
        _preimport()
        _await(io / "request.json")
    started = time.monotonic()
    request_data = json.loads((io / "request.json").read_text())
    try:
        if request_data.get("task"):
            answer = _task(request_data)
        else:
            result = _convert(io)
    except BaseException as exc:
        kind, message = _describe(exc, limits)
        if kind == exchange.CRASH:
            traceback.print_exc()
        exchange.write_error(io, kind, message)
        return 0
    if request_data.get("task"):
        exchange.write_task_result(io, answer, _figures(started))
    else:
        exchange.write_result(io, result, _figures(started))
    return 0


PREIMPORT = ("numpy", "onnx", "onnxruntime", "torch", "torch.onnx", "transformers", "transformers.modeling_utils",
             "safetensors.torch", "tokenizers", "worker.plugins.registry", "worker.support.transformers_export")


def _preimport() -> None:
    """What most converts load first, imported before any user input exists (a warm sandbox)."""
    import importlib

    for name in PREIMPORT:
        try:
            importlib.import_module(name)
        except Exception:  # a slim image without torch: the convert imports what it needs, or says so
            pass
    try:
        from transformers import AutoConfig, AutoModel, AutoTokenizer  # noqa: F401 - resolves the lazy modules
    except Exception:
        pass


def _await(request: Path) -> None:
    """Until the parent renames the request into place (it writes the inputs first)."""
    while not request.exists():
        time.sleep(0.01)


def _task(data: dict) -> dict:
    from worker.sandbox.tasks import task_function

    answer = task_function(data["task"])(data["params"], Path(data["source"]), Path(data["workdir"]))
    if not isinstance(answer, dict):
        raise TypeError(f"sandbox task {data['task']} returned {type(answer).__name__}, not a dict")
    return answer


def _convert(io: Path):
    from worker.plugins import registry
    from worker.sandbox import exchange

    data, request = exchange.read_request(io)
    converter = registry.converters[data["converter"]]()
    if data.get("architecture"):  # a student pruned by the compress stage, rebuilt by modelyard's factory
        from worker.compress import cnn

        with cnn.bound(data["architecture"]):
            return converter.convert(request)
    return converter.convert(request)


def _describe(exc: BaseException, limits) -> tuple[str, str]:
    from shared.errors import TransientError, UserInputError, one_line
    from worker.sandbox import exchange

    if isinstance(exc, UserInputError):
        return exchange.USER, str(exc)
    if isinstance(exc, TransientError):
        return exchange.TRANSIENT, str(exc)
    if isinstance(exc, MemoryError):
        return exchange.MEMORY, limits.memory_message()
    text = f"{type(exc).__name__}: {exc}"
    by_limit = limits.classify(text)
    if by_limit:
        return exchange.USER, by_limit
    return exchange.CRASH, f"model load failed in the sandbox: {one_line(text)}"


def _figures(started: float) -> dict[str, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "load_s": round(time.monotonic() - started, 3),
        "cpu_s": round(usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime, 3),
        "max_rss_mb": round(max(usage.ru_maxrss, children.ru_maxrss) / 1024, 1),
    }


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: torch and TensorFlow take seconds to shut down, for nothing here
