"""A small inference server for one model of a model repository (KServe v2 / Triton REST subset).

    from worker.serving import create_app, serve
    serve("gs://bucket/models", "minilm", ref="production", port=8000)

It serves ``model@ref`` (an alias such as ``production``, ``latest`` or a fixed version number)
from any repository URI that :class:`shared.repository.ModelRepository` opens. The version's
files are downloaded into a local cache folder and opened with :func:`worker.runtime.load_session`.

A background poller resolves the ref every ``poll_interval`` seconds. When it names a new
version, that version is downloaded and loaded completely *before* the served reference is
swapped; a request reads the reference once, so in-flight requests finish on the session they
started with and none is dropped. A version that fails to load leaves the old one serving; the
error is logged and shown as ``last_error`` in the model metadata (``GET /v2/models/{name}``).

Endpoints (the Open Inference Protocol REST subset that Triton and KServe speak)::

    GET  /v2                                    server metadata
    GET  /v2/health/live | /v2/health/ready
    GET  /v2/models/{name}[/versions/{v}]       model metadata (+ modelyard fields)
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer

Inference accepts JSON tensors (``data`` flat or nested, row-major) and Triton's binary tensor
extension (``Inference-Header-Content-Length`` header, ``binary_data_size`` / ``binary_data``
parameters), which ``tritonclient.http`` uses by default. Any other version of the model than
the served one is loaded on demand into a small LRU cache (``extra_versions``, default 1; the
version served before a swap goes there too, so rolling the alias back is instant). Bad requests get HTTP 400 (404 for an
unknown model or version) and a JSON body ``{"error": "..."}``. Parsing and inference run in a
thread pool, never on the event loop. ONNX Runtime is imported only when a model is loaded.
(FastAPI is imported at module level on purpose: with ``from __future__ import annotations`` a
``Request`` annotation only resolves to a module-level name, else FastAPI reads it as a query
parameter.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import shutil
import tempfile
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import ModelyardError, UserInputError
from shared.repository import ModelRepository
from shared.storage.base import safe_relative

log = logging.getLogger("modelyard.serving")

SERVER_NAME = "modelyard"
MAX_BODY_BYTES = 64 * 2**20
HEADER_LENGTH = "inference-header-content-length"

# numpy dtype names (worker.runtime's) <-> Open Inference Protocol datatypes.
DATATYPES = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64", "bfloat16": "BF16", "str": "BYTES",
}
PLATFORMS = {".onnx": "onnxruntime_onnx", ".tflite": "tflite"}


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` with ``{"error": message}``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------------------
# Loaded versions


@dataclass
class LoadedVersion:
    version: int
    session: Any  # worker.runtime.Session
    manifest: dict
    folder: Path
    platform: str
    loaded_at: float = field(default_factory=time.time)

    def tensor_metadata(self, tensors) -> list[dict]:
        return [{"name": t.name, "datatype": DATATYPES.get(t.dtype, t.dtype.upper()),
                 "shape": [d if isinstance(d, int) and d >= 0 else -1 for d in t.shape]} for t in tensors]


class ModelServer:
    """The state behind the app: the served version, the poller, the version cache."""

    def __init__(self, repository_uri: str, model: str, ref: str = "production", *,
                 poll_interval: float = 5.0, cache_dir: Path | str | None = None, threads: int = 2,
                 workers: int = 4, max_body_bytes: int = MAX_BODY_BYTES, extra_versions: int = 1,
                 providers: list[str] | None = None) -> None:
        if poll_interval <= 0:
            raise UserInputError(f"poll interval must be positive, not {poll_interval}")
        model_dir = safe_relative(model)
        self.repository = ModelRepository.open(repository_uri)
        self.model = model
        self.ref = str(ref)
        self.poll_interval = float(poll_interval)
        self.threads = threads
        self.providers = providers
        self.max_body_bytes = int(max_body_bytes)
        self.extra_versions = int(extra_versions)
        self._own_cache = cache_dir is None
        self.cache_dir = Path(tempfile.mkdtemp(prefix="modelyard-serve-")) if cache_dir is None else Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._model_cache = self.cache_dir / model_dir  # <cache>/<model>/<version>/
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="modelyard-infer")

        self._current: LoadedVersion | None = None
        self._extras: OrderedDict[int, LoadedVersion] = OrderedDict()  # other versions, LRU
        self._lock = threading.Lock()  # guards _extras, _failed and the per-version load locks
        self._version_locks: dict[int, threading.Lock] = {}
        self._loading: set[int] = set()  # versions being downloaded and opened now
        self._failed: dict[int, tuple[str, float, int]] = {}  # version -> (error, retry at, tries)
        self.last_error: dict | None = None
        self.available: list[int] = []
        self.last_poll: float | None = None
        self.swaps = 0
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # -- the served version ----------------------------------------------------------------
    @property
    def current(self) -> LoadedVersion | None:
        return self._current

    def start(self) -> None:
        """Load the version the ref names now; UserInputError if it does not exist or load."""
        version = self.repository.resolve(self.model, self.ref)
        self.available = self.repository.versions(self.model)
        self._current = self._load(version)
        self.last_poll = time.time()
        log.info("serving %s version %d (%s)", self.model, version, self.ref)

    def poll_once(self) -> bool:
        """Resolve the ref again; load and swap to a new version. True when it swapped."""
        try:
            version = self.repository.resolve(self.model, self.ref)
            self.available = self.repository.versions(self.model)
        except Exception as exc:  # noqa: BLE001 - a poll failure must never stop the poller
            self._report(None, f"cannot resolve {self.model}@{self.ref}: {exc}")
            return False
        finally:
            self.last_poll = time.time()
        current = self._current
        if current is not None and current.version == version:
            self.last_error = None  # serving what the ref names (an earlier poll may have failed)
            return False
        with self._lock:
            failed = self._failed.get(version)
        if failed and time.time() < failed[1]:
            return False  # this version failed to load recently; retry it later, keep serving
        try:
            loaded = self._get_or_load(version)
        except Exception as exc:  # noqa: BLE001
            self._remember_failure(version, exc)
            return False
        previous = self._current
        self._current = loaded  # the swap: one reference assignment, atomic under the GIL
        self.swaps += 1
        with self._lock:
            self._extras.pop(version, None)
            self._failed.pop(version, None)
        self.last_error = None
        log.info("%s@%s: now serving version %d (was %s)", self.model, self.ref, version,
                 previous.version if previous else None)
        if previous is not None:
            self._keep_as_extra(previous)
        self._prune_cache()
        return True

    def run_poller(self) -> None:
        if self.ref.isdigit() or self._poller is not None:
            return  # a fixed version never changes
        self._stop.clear()
        self._poller = threading.Thread(target=self._poll_loop, name="modelyard-poller", daemon=True)
        self._poller.start()

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_interval):
            self.poll_once()

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=30)
            self._poller = None
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self._own_cache:
            shutil.rmtree(self.cache_dir, ignore_errors=True)

    # -- any version ---------------------------------------------------------------------
    def version(self, version: int | None) -> LoadedVersion:
        """The served version (None), or another one, loaded on demand. RequestError if unknown."""
        current = self._current
        if version is None or (current is not None and current.version == version):
            if current is None:
                raise RequestError(f"model {self.model!r} is not ready: {self._error_text()}", 503)
            return current
        extra = self._cached_extra(version)
        if extra is not None:
            return extra
        with self._lock:
            failed = self._failed.get(version)
        if failed and time.time() < failed[1]:
            raise RequestError(f"model {self.model!r} version {version} cannot be loaded: {failed[0]}", 503)
        try:
            self.repository.manifest(self.model, version)
        except UserInputError:
            raise RequestError(f"model {self.model!r} has no version {version}", 404) from None
        try:
            loaded = self._get_or_load(version)
        except Exception as exc:  # noqa: BLE001
            message = self._remember_failure(version, exc, report=False)
            raise RequestError(f"model {self.model!r} version {version} cannot be loaded: {message}", 503) from None
        current = self._current
        if current is None or current.version != loaded.version:
            self._keep_as_extra(loaded)
        return loaded

    def _get_or_load(self, version: int) -> LoadedVersion:
        """The version, loaded once however many threads ask for it at the same time."""
        with self._lock:
            lock = self._version_locks.setdefault(version, threading.Lock())
        with lock:
            current = self._current
            if current is not None and current.version == version:
                return current
            extra = self._cached_extra(version)
            if extra is not None:
                return extra
            with self._lock:
                self._loading.add(version)
            try:
                return self._load(version)
            finally:
                with self._lock:
                    self._loading.discard(version)

    def _cached_extra(self, version: int) -> LoadedVersion | None:
        with self._lock:
            extra = self._extras.get(version)
            if extra is not None:
                self._extras.move_to_end(version)
            return extra

    def _keep_as_extra(self, loaded: LoadedVersion) -> None:
        with self._lock:
            if self.extra_versions <= 0:
                return
            self._extras[loaded.version] = loaded
            self._extras.move_to_end(loaded.version)
            while len(self._extras) > self.extra_versions:
                self._extras.popitem(last=False)

    def _load(self, version: int) -> LoadedVersion:
        """Download a version into the cache and open it. Raises on any failure."""
        from worker.runtime import load_session

        manifest = self.repository.manifest(self.model, version)
        folder = self._download(version, manifest)
        model_file = manifest.get("model_file") or _guess_model_file(folder)
        path = folder / safe_relative(model_file)
        session = load_session(path, threads=self.threads, providers=self.providers)
        platform = PLATFORMS.get(path.suffix.lower(), path.suffix.lstrip("."))
        return LoadedVersion(version=version, session=session, manifest=manifest, folder=folder, platform=platform)

    def _download(self, version: int, manifest: dict) -> Path:
        target = self._model_cache / f"{version}"
        marker = target / ".complete"
        stamp = json.dumps(manifest, sort_keys=True)
        if marker.is_file() and marker.read_text() == stamp:
            return target  # a complete earlier download of this very version
        self._model_cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".part", dir=self._model_cache))
        try:
            prefix = f"{self.model}/{version}/"
            for key in self.repository.store.list(prefix):
                name = key[len(prefix):]
                if name == ".claim" or name.endswith(".lock"):
                    continue
                self.repository.store.get_object(key, tmp / safe_relative(name))
            (tmp / ".complete").write_text(stamp)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    def _prune_cache(self) -> None:
        """Delete downloaded versions no longer loaded (open sessions keep their memory)."""
        with self._lock:
            keep = {str(v) for v in (*self._extras, *self._loading)}
        current = self._current
        if current is not None:
            keep.add(str(current.version))
        for entry in self._model_cache.iterdir():
            if entry.is_dir() and entry.name.isdigit() and entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)

    def _remember_failure(self, version: int, exc: BaseException, *, report: bool = True) -> str:
        message = str(exc) if isinstance(exc, ModelyardError) else f"{type(exc).__name__}: {exc}"
        with self._lock:
            tries = self._failed.get(version, ("", 0.0, 0))[2] + 1
            backoff = min(300.0, self.poll_interval * 2 ** min(tries, 10))
            self._failed[version] = (message, time.time() + backoff, tries)
        if report:
            self._report(version, message)
        return message

    def _report(self, version: int | None, message: str) -> None:
        current = self._current
        self.last_error = {"version": version, "error": message, "at": time.time(),
                           "serving": current.version if current else None}
        log.error("%s@%s: version %s not loaded, still serving %s: %s", self.model, self.ref, version,
                  current.version if current else "nothing", message)

    def _error_text(self) -> str:
        return self.last_error["error"] if self.last_error else "no version loaded"

    # -- protocol ------------------------------------------------------------------------
    def check_name(self, name: str) -> None:
        if name != self.model:
            raise RequestError(f"unknown model {name!r}: this server serves {self.model!r}", 404)

    def metadata(self, loaded: LoadedVersion, *, served: bool) -> dict:
        session = loaded.session
        return {
            "name": self.model,
            "versions": [str(v) for v in (self.available or [loaded.version])],
            "platform": loaded.platform,
            "inputs": loaded.tensor_metadata(session.inputs),
            "outputs": loaded.tensor_metadata(session.outputs),
            # modelyard's own fields: which version the ref serves, and the last failed swap.
            "version": str(loaded.version),
            "ref": self.ref,
            "serving_version": str(self._current.version) if self._current else None,
            "served": served,
            "repository": self.repository.uri,
            "last_poll": self.last_poll,
            "last_error": self.last_error,
        }

    def infer(self, loaded: LoadedVersion, body: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        """Run one inference request; returns the response body and extra headers."""
        request, binary = _split_body(body, headers)
        feeds, wanted, binary_out = _parse_request(request, binary, loaded.session)
        try:
            results = loaded.session.run(feeds)
        except UserInputError as exc:
            raise RequestError(str(exc)) from None
        outputs = []
        buffers = []
        texts: dict[str, str] = {}  # placeholder -> preformatted JSON array text
        for name in wanted or [t.name for t in loaded.session.outputs]:
            array = np.asarray(results[name])
            as_binary = binary_out.get(name, binary_out.get("*", False))
            entry: dict[str, Any] = {"name": name, "datatype": _datatype_of(array), "shape": list(array.shape)}
            if as_binary:
                raw = _binary_of(array)
                entry["parameters"] = {"binary_data_size": len(raw)}
                buffers.append(raw)
            else:
                text = _float_text(array)
                if text is None:
                    entry["data"] = _json_data(array)
                else:
                    token = f"\0{uuid.uuid4().hex}\0"
                    texts[json.dumps(token)] = text
                    entry["data"] = token
            outputs.append(entry)
        response: dict[str, Any] = {"model_name": self.model, "model_version": str(loaded.version),
                                    "outputs": outputs}
        if "id" in request:
            response["id"] = request["id"]
        document = json.dumps(response, separators=(",", ":"))
        for token, data in texts.items():
            document = document.replace(token, data, 1)
        text = document.encode()
        if not buffers:
            return text, {"content-type": "application/json"}
        return text + b"".join(buffers), {"content-type": "application/octet-stream",
                                          "inference-header-content-length": str(len(text))}


def _guess_model_file(folder: Path) -> str:
    for suffix in PLATFORMS:
        found = sorted(folder.glob(f"*{suffix}"))
        if found:
            return found[0].name
    raise UserInputError(f"no .onnx or .tflite model file in {folder.name}")


# ------------------------------------------------------------------------------------------
# Request parsing


def _split_body(body: bytes, headers: dict[str, str]) -> tuple[dict, bytes]:
    """The JSON request header and the binary tensor section after it."""
    length = headers.get(HEADER_LENGTH)
    if length is not None:
        if not length.strip().isdigit() or int(length) > len(body):
            raise RequestError(f"Inference-Header-Content-Length {length!r} is not a length within the "
                               f"{len(body)}-byte body")
        head, binary = body[: int(length)], body[int(length):]
    else:
        head, binary = body, b""
    try:
        request = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise RequestError("the request body must be a JSON object with an 'inputs' list")
    return request, binary


def _parse_request(request: dict, binary: bytes, session) -> tuple[dict, list[str], dict[str, bool]]:
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError("the request needs an 'inputs' list with one entry per model input")
    parameters = request.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RequestError("'parameters' must be a JSON object")
    by_name = {t.name: t for t in session.inputs}
    feeds: dict[str, np.ndarray] = {}
    offset = 0
    for index, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise RequestError(f"inputs[{index}] must be a JSON object")
        name = tensor.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError(f"inputs[{index}] has no 'name'")
        info = by_name.get(name)
        if info is None:
            raise RequestError(f"unexpected input {name!r}: the model takes {', '.join(by_name) or 'nothing'}")
        if name in feeds:
            raise RequestError(f"input {name!r} is given twice")
        array, used = _tensor(tensor, info, binary, offset)
        offset += used
        feeds[name] = array
    missing = [n for n in by_name if n not in feeds]
    if missing:
        raise RequestError(f"missing input(s) {', '.join(missing)}: the model takes {', '.join(by_name)}")
    if offset != len(binary):
        raise RequestError(f"the body has {len(binary)} bytes of binary tensor data, the inputs use {offset}")

    binary_all = parameters.get("binary_data_output", False)
    if not isinstance(binary_all, bool):
        raise RequestError("parameter binary_data_output must be true or false")
    binary_out: dict[str, bool] = {"*": binary_all}
    wanted: list[str] = []
    outputs = request.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise RequestError("'outputs' must be a list of {\"name\": ...} objects")
        known = [t.name for t in session.outputs]
        for index, entry in enumerate(outputs):
            name = entry.get("name") if isinstance(entry, dict) else None
            if not isinstance(name, str):
                raise RequestError(f"outputs[{index}] must be an object with a 'name'")
            if name not in known:
                raise RequestError(f"unknown output {name!r}: the model gives {', '.join(known)}")
            if name in wanted:
                raise RequestError(f"output {name!r} is requested twice")
            params = entry.get("parameters") or {}
            if not isinstance(params, dict):
                raise RequestError(f"outputs[{index}].parameters must be a JSON object")
            if params.get("classification"):
                raise RequestError("the classification extension is not supported")
            flag = params.get("binary_data", binary_all)
            if not isinstance(flag, bool):
                raise RequestError(f"outputs[{index}].parameters.binary_data must be true or false")
            binary_out[name] = flag
            wanted.append(name)
    return feeds, wanted, binary_out


def _tensor(tensor: dict, info, binary: bytes, offset: int) -> tuple[np.ndarray, int]:
    """One input as an array of the model's dtype and the request's shape; bytes of binary used."""
    name = info.name
    expected_type = DATATYPES.get(info.dtype, info.dtype.upper())
    datatype = tensor.get("datatype")
    if datatype != expected_type:
        raise RequestError(f"input {name!r} has datatype {datatype!r}, the model expects {expected_type}")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise RequestError(f"input {name!r}: 'shape' must be a list of non-negative integers, not {shape!r}")
    model_shape = [d if isinstance(d, int) and d >= 0 else -1 for d in info.shape]
    if len(shape) != len(model_shape) or any(w != -1 and g != w for g, w in zip(shape, model_shape)):
        raise RequestError(f"input {name!r} has shape {shape}, the model expects {model_shape} (-1: any size)")
    count = math.prod(shape)
    params = tensor.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError(f"input {name!r}: 'parameters' must be a JSON object")
    size = params.get("binary_data_size")
    if size is not None:
        if "data" in tensor:
            raise RequestError(f"input {name!r} has both 'data' and binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
            raise RequestError(f"input {name!r}: binary_data_size {size!r} does not fit the "
                               f"{len(binary) - offset} bytes of binary data left in the body")
        return _from_binary(name, info.dtype, shape, count, binary[offset: offset + size]), size
    if "data" not in tensor:
        raise RequestError(f"input {name!r} has no 'data'")
    return _from_json(name, info.dtype, shape, count, tensor["data"]), 0


def _from_binary(name: str, dtype: str, shape: list[int], count: int, raw: bytes) -> np.ndarray:
    if dtype == "str":
        items, pos = [], 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise RequestError(f"input {name!r}: truncated BYTES element length")
            length = int.from_bytes(raw[pos: pos + 4], "little")
            pos += 4
            if pos + length > len(raw):
                raise RequestError(f"input {name!r}: a BYTES element runs past its data")
            items.append(raw[pos: pos + length].decode("utf-8", errors="replace"))
            pos += length
        if len(items) != count:
            raise RequestError(f"input {name!r} has {len(items)} elements, shape {shape} needs {count}")
        return np.array(items, dtype=object).reshape(shape)
    if dtype == "bfloat16":
        raise RequestError(f"input {name!r}: BF16 inputs are not supported by this server")
    np_dtype = np.dtype(dtype)
    if len(raw) != count * np_dtype.itemsize:
        raise RequestError(f"input {name!r} has {len(raw)} bytes of binary data, shape {shape} of "
                           f"{DATATYPES[dtype]} needs {count * np_dtype.itemsize}")
    array = np.frombuffer(raw, dtype=np_dtype.newbyteorder("<")).reshape(shape)
    return array.astype(np_dtype) if not np_dtype.isnative else array


def _from_json(name: str, dtype: str, shape: list[int], count: int, data: Any) -> np.ndarray:
    if not isinstance(data, list):
        raise RequestError(f"input {name!r}: 'data' must be a list (flat or nested, row-major)")
    if dtype == "str":
        flat = _flatten(name, data)
        if not all(isinstance(x, str) for x in flat):
            raise RequestError(f"input {name!r}: BYTES data must be strings")
        array = np.array(flat, dtype=object)
    elif dtype == "bfloat16":
        raise RequestError(f"input {name!r}: BF16 inputs are not supported by this server")
    else:
        try:
            array = np.array(data)
        except ValueError:  # ragged nesting
            raise RequestError(f"input {name!r}: 'data' is not a regular (non-ragged) list of numbers") from None
        array = _checked_numbers(name, dtype, array)
    if array.size != count:
        raise RequestError(f"input {name!r} has {array.size} data elements, shape {shape} needs {count}")
    return array.reshape(shape)


def _flatten(name: str, data: list) -> list:
    flat: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _checked_numbers(name: str, dtype: str, array: np.ndarray) -> np.ndarray:
    np_dtype = np.dtype(dtype)
    kind = array.dtype.kind
    if array.size == 0:
        return array.astype(np_dtype)
    if np_dtype.kind == "b":
        ok = kind == "b"
    elif np_dtype.kind in "iu":
        ok = kind in "iu"
    else:
        ok = kind in "iuf"
    if not ok:
        want = {"b": "true/false values", "i": "integers", "u": "integers"}.get(np_dtype.kind, "numbers")
        raise RequestError(f"input {name!r}: {DATATYPES[dtype]} data must be {want}")
    if np_dtype.kind in "iu":
        limits = np.iinfo(np_dtype)
        if int(array.min()) < limits.min or int(array.max()) > limits.max:
            raise RequestError(f"input {name!r}: a value is out of the {DATATYPES[dtype]} range")
    elif np_dtype.kind == "f" and np_dtype.itemsize < 8 and kind == "f":
        finite = array[np.isfinite(array)]
        if finite.size and float(np.abs(finite).max()) > float(np.finfo(np_dtype).max):
            raise RequestError(f"input {name!r}: a value is out of the {DATATYPES[dtype]} range")
    return array.astype(np_dtype, copy=False)


def _datatype_of(array: np.ndarray) -> str:
    if array.dtype.kind in "OUS":
        return "BYTES"
    return DATATYPES.get(array.dtype.name, array.dtype.name.upper())


def _binary_of(array: np.ndarray) -> bytes:
    if array.dtype.kind in "OUS":
        parts = []
        for item in array.ravel():
            raw = item if isinstance(item, bytes) else str(item).encode()
            parts.append(len(raw).to_bytes(4, "little") + raw)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _json_data(array: np.ndarray) -> list:
    if array.dtype.kind in "OUS":
        return [x.decode("utf-8", errors="replace") if isinstance(x, bytes) else str(x) for x in array.ravel()]
    return array.ravel().tolist()


def _float_text(array: np.ndarray) -> str | None:
    """FP32/FP16 data as JSON array text, 2-3x faster than json.dumps of floats, or None.

    ``%.9g`` (``%.5g`` for FP16) round-trips every value exactly; json.dumps would spend
    0.6 us a value on the 17-digit repr of the widened double. Non-finite values (which
    JSON cannot spell) fall back to json.dumps.
    """
    if array.dtype not in (np.float32, np.float16) or array.size == 0 or not np.isfinite(array).all():
        return None
    spec = "%.9g" if array.dtype == np.float32 else "%.5g"
    return "[" + ",".join([spec] * array.size) % tuple(array.ravel().tolist()) + "]"


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise RequestError(f"Content-Encoding {encoding!r} is not supported (use gzip, deflate or none)")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise RequestError(f"the {encoding} request body does not decompress: {exc}") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise RequestError(f"the decompressed request body is over the {limit}-byte limit")
    return data


# ------------------------------------------------------------------------------------------
# The app


def create_app(repository_uri: str, model: str, ref: str = "production", poll_interval: float = 5.0, *,
               cache_dir: Path | str | None = None, threads: int = 2, workers: int = 4,
               max_body_bytes: int = MAX_BODY_BYTES, extra_versions: int = 1,
               providers: list[str] | None = None):
    """A FastAPI app serving ``model@ref``. Loads the version now: UserInputError if it cannot.

    The poller runs while the app runs (its lifespan); ``app.state.server`` is the ModelServer.
    """
    server = ModelServer(repository_uri, model, ref, poll_interval=poll_interval, cache_dir=cache_dir,
                         threads=threads, workers=workers, max_body_bytes=max_body_bytes,
                         extra_versions=extra_versions, providers=providers)
    try:
        server.start()
    except BaseException:
        server.close()
        raise

    @asynccontextmanager
    async def lifespan(app):
        server.run_poller()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, server.close)

    app = FastAPI(title=f"modelyard serving {model}", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = server

    def error(message: str, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, exc: RequestError):
        return error(str(exc), exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        return error(str(exc.detail), exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        return error(f"bad request: {exc.errors()}")

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):
        log.exception("unexpected error serving %s", request.url.path)
        return error(f"internal error: {type(exc).__name__}: {exc}", 500)

    async def in_pool(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(server.pool, fn, *args)

    def parse_version(text: str) -> int:
        if not text.isdigit() or int(text) <= 0:
            raise RequestError(f"model version must be a positive integer, not {text!r}")
        return int(text)

    async def resolve(name: str, version: str | None) -> LoadedVersion:
        server.check_name(name)
        if version is None:
            return server.version(None)
        return await in_pool(server.version, parse_version(version))

    @app.get("/v2")
    async def server_metadata():
        return {"name": SERVER_NAME, "version": "0.1.0", "extensions": ["binary_tensor_data", "model_repository"]}

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        ok = server.current is not None
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2/models/{name}")
    async def model_metadata(name: str):
        loaded = await resolve(name, None)
        return server.metadata(loaded, served=True)

    @app.get("/v2/models/{name}/versions/{version}")
    async def version_metadata(name: str, version: str):
        loaded = await resolve(name, version)
        current = server.current
        return server.metadata(loaded, served=current is not None and current.version == loaded.version)

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str):
        await resolve(name, None)
        return {"name": name, "ready": True}

    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def version_ready(name: str, version: str):
        loaded = await resolve(name, version)
        return {"name": name, "version": str(loaded.version), "ready": True}

    async def read_body(request: Request) -> bytes:
        limit = server.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(f"the request body ({declared} bytes) is over the {limit}-byte limit")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(f"the request body is over the {limit}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    async def infer(request: Request, name: str, version: str | None):
        loaded = await resolve(name, version)
        body = await read_body(request)
        headers = {k: request.headers[k] for k in (HEADER_LENGTH, "content-encoding") if k in request.headers}

        def work() -> tuple[bytes, dict[str, str]]:
            raw = _decompress(body, headers.pop("content-encoding", ""), server.max_body_bytes)
            return server.infer(loaded, raw, headers)

        content, extra = await in_pool(work)
        media = extra.pop("content-type")
        return Response(content=content, media_type=media, headers=extra)

    @app.post("/v2/models/{name}/infer")
    async def infer_served(request: Request, name: str):
        return await infer(request, name, None)

    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer_version(request: Request, name: str, version: str):
        return await infer(request, name, version)

    return app


def serve(repository_uri: str, model: str, ref: str = "production", *, host: str = "127.0.0.1",
          port: int = 8000, poll_interval: float = 5.0, log_level: str = "info", **options) -> None:
    """Load ``model@ref`` and serve it with uvicorn until interrupted."""
    import uvicorn

    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    app = create_app(repository_uri, model, ref, poll_interval, **options)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
