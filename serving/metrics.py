"""Prometheus metrics of ``modelyard serve``, served at ``GET /metrics``.

Each app has its own :class:`prometheus_client.CollectorRegistry` (two apps in one process, as
in the tests, never share or clash). Requests are counted and timed by an ASGI middleware
labelled with the *route template* (``/v2/models/{name}/infer``), never the raw path, so a
client cannot grow the label set; a path no route matches is ``unmatched``.

=============================================  ===========================================
``modelyard_serve_requests_total``              requests by route, method and status code
``modelyard_serve_request_duration_seconds``    latency histogram by route (whole request)
``modelyard_serve_errors_total``                error responses by route and kind
                                                (``client``: 4xx, ``server``: 5xx)
``modelyard_serve_batch_size``                  rows (first dimension) per inference
``modelyard_serve_loaded_version``              the version the ref serves now (read at scrape)
``modelyard_serve_version_swaps``               alias moves followed (read at scrape)
``modelyard_serve_device_info``                 1, labelled with the requested device and the
                                                provider that runs it
=============================================  ===========================================
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
UNMATCHED = "unmatched"


class ServingMetrics:
    """The metrics of one app, in a registry of its own."""

    def __init__(self, model: str, ref: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model = model
        self.ref = ref
        self.requests = Counter("modelyard_serve_requests", "HTTP requests by route template, method and status code.",
                                ["route", "method", "code"], registry=self.registry)
        self.latency = Histogram("modelyard_serve_request_duration_seconds",
                                 "Time from request to the end of the response, by route template.", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.errors = Counter("modelyard_serve_errors", "Error responses by route template and kind "
                              "(client: 4xx, server: 5xx).", ["route", "kind"], registry=self.registry)
        self.batch = Histogram("modelyard_serve_batch_size", "Rows (first dimension) per inference request.",
                               buckets=BATCH_BUCKETS, registry=self.registry)
        self.loaded_version = Gauge("modelyard_serve_loaded_version", "The model version the ref serves now "
                                    "(0: none loaded).", ["model", "ref"], registry=self.registry)
        self.swaps = Gauge("modelyard_serve_version_swaps", "Alias moves this server followed since it started.",
                           ["model", "ref"], registry=self.registry)
        self.device = Gauge("modelyard_serve_device_info", "1, labelled with the requested device and the "
                            "execution provider that runs the model.", ["requested", "provider"],
                            registry=self.registry)

    def follow(self, loaded_version: Callable[[], int], swaps: Callable[[], int]) -> None:
        """Read the served version and the swap count at each scrape."""
        self.loaded_version.labels(self.model, self.ref).set_function(loaded_version)
        self.swaps.labels(self.model, self.ref).set_function(swaps)

    def set_device(self, requested: str, provider: str) -> None:
        self.device.labels(requested, provider).set(1)

    def observe_batch(self, rows: int) -> None:
        self.batch.observe(rows)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if status >= 400:
            self.errors.labels(route, "client" if status < 500 else "server").inc()

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """A plain ASGI middleware (no per-request task or body copy) that counts and times requests."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], metrics: ServingMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client gets when the app raises before answering

        async def send_with_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or UNMATCHED  # the router sets it on this scope
            self.metrics.observe_request(route, scope.get("method", ""), status, time.perf_counter() - start)
