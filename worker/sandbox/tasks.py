"""Loads of a user's model other than a converter's, run in the sandbox as named *tasks*.

A task is a plain function ``fn(params, source, out) -> dict``: it reads the user's files at
``source`` (read-only), writes what it makes into ``out`` (the workdir) and returns a JSON object.
The child finds it in ``TASKS`` by name, nothing else: a request cannot name other code.

* ``compress-teacher``: the compress stage's teacher, loaded as the stage would and written back
  as safetensors (+ config and tokenizer files re-serialized): the stage then trains against
  what the sandbox wrote, never the user's bytes;
* ``genai-build``: ONNX Runtime GenAI's model builder on a text-generation source, for the
  ``genai-*`` variants (the convert stage's export already runs inside the converter's sandbox).

``MODELYARD_SANDBOX=off`` runs the function in the worker process (the operator's opt-out).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.settings import Settings

TASKS = {
    "compress-teacher": "worker.compress.teacher:export_teacher",
    "genai-build": "worker.support.genai_builder:build_task",
}


def task_function(name: str) -> Callable[[dict, Path, Path], dict]:
    module, _, function = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), function)


def run_task(name: str, params: dict[str, Any], *, source: Path, workdir: Path,
             settings: Settings) -> tuple[dict[str, Any], dict]:
    """``TASKS[name](params, source, workdir)``, sandboxed unless MODELYARD_SANDBOX=off: (answer, sandbox record).

    The answer crosses the sandbox's wall: the caller checks every field it uses. The workdir holds
    plain files and folders only (``output.check_plain``).
    """
    if name not in TASKS:
        raise ValueError(f"no sandbox task {name!r}")
    Path(workdir).mkdir(parents=True, exist_ok=True)
    if settings.sandbox == "off":
        return task_function(name)(params, Path(source), Path(workdir)), {"mode": "off",
                                                                          "reason": "MODELYARD_SANDBOX=off"}
    from worker.sandbox import exchange
    from worker.sandbox.boxed import run_boxed
    from worker.sandbox.output import check_plain
    from worker.sandbox.status import require_sandbox

    require_sandbox(settings)
    request = exchange.task_request(name, params)
    answer = run_boxed(settings, source=Path(source), workdir=Path(workdir), request=request, write_inputs=None,
                       read=exchange.read_task_result)
    check_plain(Path(workdir).resolve())
    return answer
