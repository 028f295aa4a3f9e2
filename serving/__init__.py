"""The model server, ``modelyard serve``: one model of a model repository over KServe v2 / Triton REST.

    import serving
    serving.serve("gs://bucket/models", "minilm", ref="production", port=8000)
    app = serving.create_app(uri, "minilm", "production")  # the FastAPI app, e.g. for a TestClient

It serves ``model@ref`` (an alias such as ``production``, ``latest`` or a fixed version number)
from any repository URI that :class:`shared.repository.ModelRepository` opens. The version's
files are downloaded into a local cache folder and opened with
:func:`shared.inference.runtime.load_session` (ONNX Runtime is imported only when a model is loaded).

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
parameters), which ``tritonclient.http`` uses by default; the body may be gzip or deflate
compressed. Any other version of the model than the served one is loaded on demand into a
small LRU cache (``extra_versions``, default 1; the version served before a swap goes there
too, so rolling the alias back is instant). Bad requests get HTTP 400 (404 for an unknown
model or version, 503 for a version that cannot be loaded) and a JSON body ``{"error": "..."}``.
Parsing and inference run in a thread pool, never on the event loop.

For production: ``device`` (``cpu``, ``cuda``, ``tensorrt``; tried at start, falling back with
the reason reported), Prometheus ``GET /metrics``, an optional bearer token (every route but the
health probes), and a cap on the batch (``max_batch_size``, from the version's Triton config or
the option), checked before any tensor is decoded. There is no ``/v2/repository/*``: the server
advertises only the binary tensor extension.

The modules, from the wire inwards: :mod:`serving.app` (routes, errors, ``serve``),
:mod:`serving.auth` (the token), :mod:`serving.metrics` (Prometheus), :mod:`serving.protocol`
and :mod:`serving.tensors` (the protocol's requests, responses and tensors),
:mod:`serving.model_server` (the model a request reaches), :mod:`serving.alias` (following the
ref), :mod:`serving.versions` (loaded versions and their download cache) and
:mod:`serving.devices` (execution providers). :mod:`serving.triton_sync` keeps Triton's local
copy of a repository (``modelyard triton-sync``); :mod:`serving.device_check` is the GPU image's
start-time check.
"""

from __future__ import annotations

from serving.app import create_app, serve

__all__ = ["create_app", "serve"]
