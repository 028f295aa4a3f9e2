"""Vertex mode of the model server: ``modelyard serve --vertex`` as a Vertex AI custom container.

Vertex AI starts the container with ``AIP_*`` variables (its custom container contract):

* ``AIP_HTTP_PORT``: listen there, on 0.0.0.0 (default 8080);
* ``AIP_HEALTH_ROUTE``: answer GET with 200 once the model is loaded, 503 before;
* ``AIP_PREDICT_ROUTE``: answer POST ``{"instances": [...], "parameters": {...}}`` with
  ``{"predictions": [...]}``, one prediction per instance;
* ``AIP_STORAGE_URI``: where Vertex copied the Model's ``artifact_uri``. For a version a
  ``deploy.vertex`` job released with ``serving: modelyard`` that is the version's folder (its
  ``manifest.json`` names the model and version); a whole repository works too (``--alias`` or
  ``--version`` choose, default ``production``; the model is the only one, or named).

Instances follow Vertex's (and TF Serving's) row format: for a model whose inputs have a batch
axis, each instance is one row, either the value of the only input or ``{input name: value}``;
the instances are stacked into one batch. A model without a batch axis takes one instance.
Each prediction is the row of the only output, or ``{output name: row}``. ``parameters`` must
be an object if given; none are used yet. A body over Vertex AI's online prediction limit
(1.5 MB) is answered 413 before it is read whole: Vertex would refuse it anyway, and a server
that accepts more invites batches no deployment was sized for. The rest of the server (the
KServe v2 routes) runs as in :mod:`serving.app`, under the same body limit.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from serving.app import create_app
from serving.auth import check_bearer
from serving.errors import RequestError
from serving.versions import LoadedVersion
from shared.arrays import TensorInfo
from shared.errors import UserInputError
from shared.repository import ModelRepository
from shared.storage import open_store
from shared.storage.base import safe_relative

VERTEX_MAX_REQUEST_BYTES = 1_500_000  # Vertex AI online prediction's request limit, 1.5 MB
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class VertexEnvironment:
    """What Vertex AI tells the container, with the defaults a local run gets."""

    port: int = 8080
    health_route: str = "/health"
    predict_route: str = "/predict"
    storage_uri: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> VertexEnvironment:
        port = env.get("AIP_HTTP_PORT", "8080")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise UserInputError(f"AIP_HTTP_PORT {port!r} is not a port number")
        routes = {key: env.get(key) or default for key, default in
                  (("AIP_HEALTH_ROUTE", cls.health_route), ("AIP_PREDICT_ROUTE", cls.predict_route))}
        for key, route in routes.items():
            if not route.startswith("/"):
                raise UserInputError(f"{key} {route!r} must be a path starting with '/'")
        return cls(port=int(port), health_route=routes["AIP_HEALTH_ROUTE"],
                   predict_route=routes["AIP_PREDICT_ROUTE"], storage_uri=env.get("AIP_STORAGE_URI") or None)


def vertex_requested(env: Mapping[str, str] = os.environ) -> bool:
    """True inside a Vertex AI prediction container (it sets AIP_MODE=PREDICTION and AIP_HTTP_PORT)."""
    return env.get("AIP_MODE") == "PREDICTION" or "AIP_HTTP_PORT" in env


# -- what to serve ------------------------------------------------------------------------------


def locate_model(storage_uri: str, folder: Path, *, model: str | None = None,
                 ref: str | None = None) -> tuple[str, str, str]:
    """(repository URI, model, ref) to serve from ``AIP_STORAGE_URI``.

    A version folder (a ``manifest.json`` at its root) is copied into ``folder`` as a one-version
    repository and served at that fixed version; a repository is served as is.
    """
    store = open_store(storage_uri)
    manifest = store.read_json_or_none(MANIFEST)
    if manifest is None:
        repository = ModelRepository(store)
        if model is None:
            models = repository.models()
            if len(models) != 1:
                raise UserInputError(f"AIP_STORAGE_URI {storage_uri} holds {len(models)} models "
                                     f"({', '.join(models) or 'none'}): name the one to serve")
            model = models[0]
        return store.uri, model, ref or "production"
    name, version = str(manifest.get("model", "")), manifest.get("version")
    if not name or not isinstance(version, int):
        raise UserInputError(f"{storage_uri}/{MANIFEST} names no model and version: not a modelyard version folder")
    if model is not None and model != name:
        raise UserInputError(f"AIP_STORAGE_URI {storage_uri} holds {name!r}, not {model!r}")
    target = folder / safe_relative(name) / str(version)
    for key in store.list(""):
        if key != ".claim" and not key.endswith(".lock"):
            store.get_object(key, target / safe_relative(key))
    return folder.resolve().as_uri(), name, str(version)


# -- instances in, predictions out --------------------------------------------------------------


def _batched(tensors: Sequence[TensorInfo]) -> bool:
    return bool(tensors) and all(t.shape and (isinstance(t.shape[0], str) or t.shape[0] < 0) for t in tensors)


def instances_to_feeds(instances: list, inputs: Sequence[TensorInfo]) -> dict[str, np.ndarray]:
    """The model's feeds from Vertex instances (see the module doc)."""
    names = [t.name for t in inputs]
    rows: dict[str, list] = {name: [] for name in names}
    for index, instance in enumerate(instances):
        if isinstance(instance, dict):
            missing, extra = [n for n in names if n not in instance], [k for k in instance if k not in rows]
            if missing or extra:
                wrong = (f"; missing {missing}" if missing else "") + (f"; unknown {extra}" if extra else "")
                raise RequestError(f"instances[{index}] must have the model's inputs {names}{wrong}")
            for name in names:
                rows[name].append(instance[name])
        elif len(names) == 1:
            rows[names[0]].append(instance)
        else:
            raise RequestError(f"instances[{index}] must be an object {{input name: value}}: the model takes {names}")
    batched = _batched(inputs)
    if not batched and len(instances) != 1:
        raise RequestError(f"the model has no batch axis: send one instance, not {len(instances)}")
    feeds = {}
    for info in inputs:
        try:
            feeds[info.name] = np.asarray(rows[info.name] if batched else rows[info.name][0],
                                          dtype=object if info.dtype == "str" else None)
        except ValueError as exc:
            raise RequestError(f"input {info.name!r}: the instances do not form one array ({exc})") from None
        if feeds[info.name].dtype == object and info.dtype != "str":
            raise RequestError(f"input {info.name!r}: the instances are not numbers of one shape")
    return feeds


def predictions(results: Mapping[str, np.ndarray], outputs: Sequence[TensorInfo], count: int) -> list:
    """One prediction per instance: the only output's row, or ``{output name: row}``."""
    names = [t.name for t in outputs]
    if not _batched(outputs):
        values = {name: np.asarray(results[name]).tolist() for name in names}
        return [values[names[0]] if len(names) == 1 else values]
    rows = {name: np.asarray(results[name]).tolist() for name in names}
    for name, value in rows.items():
        if len(value) != count:
            raise RequestError(f"output {name!r} has {len(value)} rows for {count} instances", 500)
    if len(names) == 1:
        return rows[names[0]]
    return [{name: rows[name][i] for name in names} for i in range(count)]


def predict(loaded: LoadedVersion, body: bytes) -> bytes:
    """A Vertex prediction request body in, the response body out."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None
    instances = request.get("instances") if isinstance(request, dict) else None
    if not isinstance(instances, list) or not instances:
        raise RequestError('the request must be a JSON object {"instances": [...]} with at least one instance')
    if not isinstance(request.get("parameters") or {}, dict):
        raise RequestError("'parameters' must be a JSON object")
    results = loaded.run(instances_to_feeds(instances, loaded.session.inputs))  # the batch cap, then the model
    return json.dumps({"predictions": predictions(results, loaded.session.outputs, len(instances))}).encode()


# -- the routes and the app ---------------------------------------------------------------------


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the request body ({declared} bytes) is over Vertex AI's online prediction limit "
                           f"of {limit} bytes: send fewer instances per request", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"the request body is over Vertex AI's online prediction limit of {limit} bytes: "
                               "send fewer instances per request", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def vertex_router(environment: VertexEnvironment, limit: int = VERTEX_MAX_REQUEST_BYTES) -> APIRouter:
    """The health and predict routes at the paths Vertex AI gave."""
    router = APIRouter()

    async def health(request: Request) -> JSONResponse:
        ready = request.app.state.server.current is not None
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def predict_route(request: Request) -> Response:
        context = request.app.state.context
        check_bearer(request.headers.get("authorization"), context.token)  # Vertex checks IAM; a token is extra
        body = await _read_body(request, limit)
        loaded = context.server.version(None)
        return Response(await context.in_pool(predict, loaded, body), media_type="application/json")

    router.add_api_route(environment.health_route, health, methods=["GET"])
    router.add_api_route(environment.predict_route, predict_route, methods=["POST"])
    return router


def create_vertex_app(environment: VertexEnvironment, *, model: str | None = None, ref: str | None = None,
                      cache_dir: Path | str | None = None, **options: Any) -> FastAPI:
    """The model server of :func:`serving.create_app` plus the Vertex routes, serving AIP_STORAGE_URI."""
    if environment.storage_uri is None:
        raise UserInputError("AIP_STORAGE_URI is not set: Vertex AI sets it to the Model's artifact_uri copy")
    staging = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="modelyard-vertex-"))
    repository, name, served_ref = locate_model(environment.storage_uri, staging / "repository", model=model,
                                                ref=ref)
    options.setdefault("max_body_bytes", VERTEX_MAX_REQUEST_BYTES)
    app = create_app(repository, name, served_ref, cache_dir=staging / "cache", **options)
    app.include_router(vertex_router(environment, int(options["max_body_bytes"])))
    return app


def serve_vertex(*, env: Mapping[str, str] = os.environ, log_level: str = "info", **options: Any) -> None:
    """Serve as a Vertex AI custom container until stopped: 0.0.0.0:AIP_HTTP_PORT."""
    import uvicorn

    environment = VertexEnvironment.from_env(env)
    app = create_vertex_app(environment, **options)
    uvicorn.run(app, host="0.0.0.0", port=environment.port, log_level=log_level, access_log=False)


if __name__ == "__main__":
    serve_vertex()
