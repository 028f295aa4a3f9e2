"""The HTTP side of the model server: a FastAPI app of plain routes, and ``serve`` to run it.

The routes are module-level functions on two routers: ``open_routes``
(the health probes) and ``router`` (everything else, behind the optional bearer token of
:mod:`serving.auth`). What they need (the :class:`~serving.model_server.ModelServer`, the
thread pool, the body limit, the token, the metrics) reaches them as one
:class:`ServingContext` dependency. Parsing and inference run in that pool, never on the event
loop. Every refusal is a JSON body ``{"error": "..."}`` with its HTTP status. Requests are
counted and timed for ``GET /metrics`` (:mod:`serving.metrics`).

The server implements the Open Inference Protocol's health, metadata and inference routes and
Triton's binary tensor extension, and advertises only that extension in ``GET /v2``: it has
no model repository extension (``/v2/repository/*``); its repository is modelyard's, moved by
``modelyard promote`` / ``rollback``.

FastAPI is imported at module level on purpose: with ``from __future__ import annotations`` a
``Request`` annotation only resolves to a module-level name, else FastAPI reads it as a query
parameter.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving import openai
from serving.auth import check_bearer
from serving.devices import Device
from serving.errors import RequestError
from serving.generation import GenerationEngine
from serving.metrics import MetricsMiddleware, ServingMetrics
from serving.model_server import ModelServer
from serving.protocol import HEADER_LENGTH, decompress
from serving.versions import LoadedVersion

log = logging.getLogger("modelyard.serving")

SERVER_NAME = "modelyard"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data"]  # the protocol extensions this server implements
MAX_BODY_BYTES = 64 * 2**20

T = TypeVar("T")


@dataclass(frozen=True)
class ServingContext:
    """What the routes share: the model, the inference pool, the body limit, the token, the metrics."""

    server: ModelServer
    pool: ThreadPoolExecutor
    max_body_bytes: int
    metrics: ServingMetrics
    token: str | None = None

    async def in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def loaded(self, name: str, version: str | None) -> LoadedVersion:
        """The served version (None) or the one named, which may have to be loaded first (in the pool)."""
        self.server.check_name(name)
        if version is None:
            return self.server.version(None)
        if not version.isdigit() or int(version) <= 0:
            raise RequestError(f"model version must be a positive integer, not {version!r}")
        return await self.in_pool(self.server.version, int(version))

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.server.close()


async def serving_context(request: Request) -> ServingContext:
    return request.app.state.context


Context = Annotated[ServingContext, Depends(serving_context)]


async def require_token(request: Request, context: Context) -> None:
    """The bearer token check of every route but the health probes (a no-op without a token)."""
    check_bearer(request.headers.get("authorization"), context.token)


open_routes = APIRouter()  # health probes: kubelets and load balancers send no credentials
router = APIRouter(dependencies=[Depends(require_token)])


# -- routes ----------------------------------------------------------------------------------


@open_routes.get("/v2/health/live")
async def live() -> JSONResponse:
    return JSONResponse({"live": True})


@open_routes.get("/v2/health/ready")
async def ready(context: Context) -> JSONResponse:
    ok = context.server.current is not None
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("/v2")
async def server_metadata() -> JSONResponse:
    return JSONResponse({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS})


@router.get("/metrics")
async def metrics(context: Context) -> Response:
    content, media_type = context.metrics.exposition()
    return Response(content=content, media_type=media_type)


@router.get("/v2/models/{name}")
async def model_metadata(name: str, context: Context) -> JSONResponse:
    return JSONResponse(context.server.metadata(await context.loaded(name, None)))


@router.get("/v2/models/{name}/versions/{version}")
async def version_metadata(name: str, version: str, context: Context) -> JSONResponse:
    return JSONResponse(context.server.metadata(await context.loaded(name, version)))


@router.get("/v2/models/{name}/ready")
async def model_ready(name: str, context: Context) -> JSONResponse:
    await context.loaded(name, None)
    return JSONResponse({"name": name, "ready": True})


@router.get("/v2/models/{name}/versions/{version}/ready")
async def version_ready(name: str, version: str, context: Context) -> JSONResponse:
    loaded = await context.loaded(name, version)
    return JSONResponse({"name": name, "version": str(loaded.version), "ready": True})


@router.post("/v2/models/{name}/infer")
async def infer_served(request: Request, name: str, context: Context) -> Response:
    return await _infer(request, context, await context.loaded(name, None))


@router.post("/v2/models/{name}/versions/{version}/infer")
async def infer_version(request: Request, name: str, version: str, context: Context) -> Response:
    return await _infer(request, context, await context.loaded(name, version))


async def _infer(request: Request, context: ServingContext, loaded: LoadedVersion) -> Response:
    body = await _read_body(request, context.max_body_bytes)
    headers = {k: request.headers[k] for k in (HEADER_LENGTH, "content-encoding") if k in request.headers}
    content, response_headers = await context.in_pool(_decode_and_infer, context, loaded, body, headers)
    media_type = response_headers.pop("content-type")
    return Response(content=content, media_type=media_type, headers=response_headers)


def _decode_and_infer(context: ServingContext, loaded: LoadedVersion, body: bytes,
                      headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    raw = decompress(body, headers.pop("content-encoding", ""), context.max_body_bytes)
    return loaded.infer(context.server.model, raw, headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused as soon as it passes ``limit`` bytes (declared or streamed)."""
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


# -- errors ----------------------------------------------------------------------------------


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def on_request_error(request: Request, exc: RequestError) -> JSONResponse:
    response = _error(str(exc), exc.status)
    response.headers.update(exc.headers)
    return response


async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(str(exc.detail), exc.status_code)


async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error(f"bad request: {exc.errors()}")


async def on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error serving %s", request.url.path)
    return _error(f"internal error: {type(exc).__name__}: {exc}", 500)


ERROR_HANDLERS: dict[type[Exception], Callable[..., Any]] = {
    RequestError: on_request_error,
    StarletteHTTPException: on_http_error,
    RequestValidationError: on_validation_error,
    Exception: on_unexpected_error,
}


# -- the app ---------------------------------------------------------------------------------


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Poll the alias while the app runs; on shutdown finish in-flight work and clean up."""
    context: ServingContext = app.state.context
    context.server.alias.start_polling()
    try:
        yield
    finally:
        await asyncio.get_running_loop().run_in_executor(None, context.close)


def create_app(repository_uri: str, model: str, ref: str = "production", poll_interval: float = 5.0, *,
               cache_dir: Path | str | None = None, threads: int = 2, workers: int = 4,
               max_body_bytes: int = MAX_BODY_BYTES, extra_versions: int = 1, device: Device | str = "cpu",
               strict_device: bool = False, token: str | None = None,
               max_batch_size: int | None = None) -> FastAPI:
    """A FastAPI app serving ``model@ref``. Loads the version now: UserInputError if it cannot.

    The poller runs while the app runs (its lifespan); ``app.state.server`` is the ModelServer.
    ``workers`` inferences run at the same time, each with ``threads`` ONNX Runtime threads.
    ``device``: "cpu", "cuda" or "tensorrt" (tried at start, falling back unless ``strict_device``;
    see serving.devices). ``token``: the bearer token every route but the health probes requires.
    ``max_batch_size``: the cap on rows per request for batched models (default: each version's
    own, from its Triton config).
    """
    if isinstance(device, str):
        device = Device.choose(device, strict=strict_device)
    log.info("%s", device.describe())
    metrics = ServingMetrics(model, str(ref))
    server = ModelServer(repository_uri, model, ref, poll_interval=poll_interval, cache_dir=cache_dir,
                         threads=threads, extra_versions=extra_versions, device=device,
                         max_batch_size=max_batch_size, on_batch=metrics.observe_batch)
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    served = server.current
    metrics.set_device(device.requested, served.session.provider if served else device.primary)
    metrics.follow(lambda: server.current.version if server.current else 0, lambda: server.alias.swaps)
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="modelyard-infer")
    app = FastAPI(title=f"modelyard serving {model}", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = server
    app.state.context = ServingContext(server=server, pool=pool, max_body_bytes=int(max_body_bytes),
                                       metrics=metrics, token=token)
    for exception, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(exception, handler)
    app.include_router(open_routes)
    app.include_router(router)
    if served is not None and isinstance(served.session, GenerationEngine):  # OpenAI routes for a text generator
        app.include_router(openai.router, dependencies=[Depends(require_token)])
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def serve(repository_uri: str, model: str, ref: str = "production", *, host: str = "127.0.0.1",
          port: int = 8000, poll_interval: float = 5.0, log_level: str = "info", **options: Any) -> None:
    """Load ``model@ref`` and serve it with uvicorn until interrupted (options: see create_app)."""
    import uvicorn

    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    app = create_app(repository_uri, model, ref, poll_interval, **options)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
