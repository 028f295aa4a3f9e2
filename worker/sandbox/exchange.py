"""What crosses the sandbox's wall, as files in its ``io`` folder: JSON and ``.npz`` without pickle.

Parent → child: ``request.json`` (for a convert: converter name, model and convert specs, the
settings values plugins read, sample text, the student architecture; for a task: its name and
parameters; always the limits) and ``samples.npz``.
Child → parent: ``result.json`` (a convert's model file, inputs, outputs and extra, or a task's
JSON answer; the child's own figures) with ``result-samples.npz`` and ``result-reference.npz``;
or ``error.json`` (kind and message).

Everything the child writes is untrusted: the parent reads it with size caps, arrays without
pickle, and checks every field's type before it uses it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shared.arrays import TensorInfo, load_arrays, save_arrays
from shared.errors import UserInputError, one_line
from shared.jobspec import ConvertSpec, ModelSpec
from shared.settings import Settings
from worker.support.plugin_io import ConvertRequest, ConvertResult

REQUEST, SAMPLES = "request.json", "samples.npz"
RESULT, RESULT_SAMPLES, RESULT_REFERENCE = "result.json", "result-samples.npz", "result-reference.npz"
ERROR = "error.json"
PLUGIN_SETTINGS = ("bench_threads", "max_archive_bytes", "allowed_factories")  # what converters read
# The ConvertRequest fields written here; a field added to ConvertRequest must cross too (a unit test checks).
REQUEST_FIELDS = ("source", "model", "convert", "workdir", "settings", "samples", "sample_text")
JSON_LIMIT = 16 * 2**20  # bytes of a result or error file the parent reads at most

# error.json kinds
USER, TRANSIENT, MEMORY, CRASH = "user", "transient", "memory", "crash"


def convert_request(request: ConvertRequest, *, converter: str, architecture: dict | None) -> dict[str, Any]:
    """The request for the child; ``boxed.run_boxed`` adds source and workdir as the child sees them."""
    return {
        "converter": converter,
        "model": request.model.model_dump(mode="json"),
        "convert": request.convert.model_dump(mode="json"),
        "settings": {name: getattr(request.settings, name) for name in PLUGIN_SETTINGS},
        "sample_text": request.sample_text,
        "has_samples": request.samples is not None,
        "architecture": architecture,
    }


def write_samples(io: Path, request: ConvertRequest) -> None:
    if request.samples is not None:
        save_arrays(io / SAMPLES, request.samples)


def task_request(task: str, params: dict[str, Any]) -> dict[str, Any]:
    """A named sandbox task (``worker.sandbox.tasks``); ``boxed.run_boxed`` adds source and workdir."""
    return {"task": task, "params": params}


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, default=str))


def read_request(io: Path) -> tuple[dict, ConvertRequest]:
    """In the child: the raw request data and the ConvertRequest a converter receives."""
    data = json.loads((io / REQUEST).read_text())
    request = ConvertRequest(
        source=Path(data["source"]),
        model=ModelSpec.model_validate(data["model"]),
        convert=ConvertSpec.model_validate(data["convert"]),
        workdir=Path(data["workdir"]),
        settings=Settings(**data["settings"]),
        samples=load_arrays(io / SAMPLES, what="model.samples") if data["has_samples"] else None,
        sample_text=data["sample_text"],
    )
    return data, request


def write_result(io: Path, result: ConvertResult, figures: dict[str, Any]) -> None:
    save_arrays(io / RESULT_SAMPLES, result.samples)
    save_arrays(io / RESULT_REFERENCE, result.reference)
    (io / RESULT).write_text(json.dumps({
        "model_file": result.model_file,
        "inputs": [t.to_dict() for t in result.inputs],
        "outputs": [t.to_dict() for t in result.outputs],
        "extra": result.extra,
        "figures": figures,
    }, default=str))


def write_task_result(io: Path, result: dict[str, Any], figures: dict[str, Any]) -> None:
    write_json(io / RESULT, {"task_result": result, "figures": figures})


def read_task_result(io: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A sandbox task's answer (a JSON object, untrusted: the caller checks its fields) and figures."""
    data = _read_json(io / RESULT)
    if data is None:
        return None
    result = data.get("task_result")
    if not isinstance(result, dict):
        raise UserInputError("the sandboxed model load returned a malformed result: no task_result object")
    return result, (data.get("figures") if isinstance(data.get("figures"), dict) else {})


def write_error(io: Path, kind: str, message: str) -> None:
    (io / ERROR).write_text(json.dumps({"kind": kind, "message": message}))


def read_error(io: Path) -> dict | None:
    """The child's error.json as {"kind", "message"}, or None when it wrote none."""
    data = _read_json(io / ERROR)
    if data is None:
        return None
    kind, message = data.get("kind"), data.get("message")
    if not isinstance(kind, str) or not isinstance(message, str):
        raise UserInputError("the sandboxed model load returned a malformed error report")
    return {"kind": kind, "message": message}


def read_result(io: Path) -> tuple[ConvertResult, dict[str, Any]] | None:
    """The child's ConvertResult and figures, or None when it wrote none."""
    data = _read_json(io / RESULT)
    if data is None:
        return None
    try:
        model_file = data["model_file"]
        if not isinstance(model_file, str) or not isinstance(data["extra"], dict):
            raise TypeError("model_file must be text and extra an object")
        result = ConvertResult(
            model_file=model_file,
            samples=load_arrays(io / RESULT_SAMPLES, what="sandbox result"),
            reference=load_arrays(io / RESULT_REFERENCE, what="sandbox result"),
            inputs=[_tensor(t) for t in data["inputs"]],
            outputs=[_tensor(t) for t in data["outputs"]],
            extra=data["extra"],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UserInputError(f"the sandboxed model load returned a malformed result: {one_line(exc)}") from None
    figures = data.get("figures") if isinstance(data.get("figures"), dict) else {}
    return result, figures


def _tensor(data: Any) -> TensorInfo:
    info = TensorInfo.from_dict(data)
    if not isinstance(info.name, str) or not isinstance(info.dtype, str) or \
            not all(isinstance(d, (int, str)) for d in info.shape):
        raise TypeError(f"not a tensor description: {one_line(data, 100)}")
    return info


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    if not path.is_file() or path.is_symlink() or path.stat().st_size > JSON_LIMIT:
        raise UserInputError(f"the sandboxed model load left an unreadable {path.name} (not a plain file "
                             f"under {JSON_LIMIT // 2**20} MB)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserInputError(f"the sandboxed model load left an unreadable {path.name}: {one_line(exc)}") from None
    if not isinstance(data, dict):
        raise UserInputError(f"the sandboxed model load left an unreadable {path.name}: not a JSON object")
    return data
