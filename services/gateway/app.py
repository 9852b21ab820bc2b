"""The gateway's aiohttp application: every API's route table, the service routes
(``/health``, ``/metrics``, ``/openapi.json``), the middlewares, ``serve()``.

Where each route is handled:

* Ollama (``/``, ``/api/*``): ``ollama_http``; its bodies and answers: ``ollama_shapes``.
* OpenAI (``/v1/*``): ``openai_http``; its bodies and answers: ``openai_shapes``.
* The request flow both share (Submit, wait, stream, disconnect): ``exchange``, ``flow``.
* Waiting over HTTP and the queues' figures (``/queue/*``): ``queue_http``.
* The operator's routes (``/admin/*``): ``admin_http``; the page (``/ui``): ``ui``.
* Errors in either API's shape: ``errors``; the ``X-Usher-*`` headers: ``controls``.

Request headers: ``Authorization: Bearer <token>`` (the tenant; the default token when
absent and configured), ``X-Usher-Priority`` (critical|high|normal|low|batch),
``X-Usher-Fallback`` (none|after_timeout|local_only), ``X-Usher-Queue-Timeout`` and
``X-Usher-Deadline`` (seconds), ``Idempotency-Key``, ``traceparent``.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import grpc
from aiohttp import web

from services.gateway import ui, views
from services.gateway.admin_http import AdminHttp
from services.gateway.backend import Backend
from services.gateway.errors import GatewayError, path_error_response
from services.gateway.exchange import Exchange, caller_token, error_answer
from services.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from services.gateway.ollama_http import OllamaHttp
from services.gateway.openai_http import OpenAIHttp
from services.gateway.openapi import openapi_document
from services.gateway.queue_http import QueueHttp, memory_now
from services.gateway.responses import json_response
from services.gateway.settings import GatewaySettings, split_listen
from services.gateway.watch_tokens import WatchTokens, derive_secret
from usher.logs import get_logger
from usher.v1 import pool_pb2

__all__ = [
    "BACKEND",
    "METRICS",
    "app_runner",
    "build_app",
    "register_routes",
    "serve",
    "start_listening",
]

log = get_logger(__name__)

BACKEND = web.AppKey("backend", Backend)
METRICS = web.AppKey("metrics", GatewayMetrics)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def register_routes(
    app: web.Application, settings: GatewaySettings, backend: Backend, metrics: GatewayMetrics
) -> None:
    """Every route of the gateway, one table per API."""

    def token_of(request: web.Request, *, allow_default: bool = True) -> str:
        return caller_token(request, settings, allow_default=allow_default)

    def fail(request: web.Request, error: GatewayError) -> web.Response:
        return error_answer(metrics, Exchange(request, "ollama"), error)

    # Unset: derived from the service credential, so every replica agrees.
    secret = settings.watch_secret.encode() or derive_secret(backend.pool_token)
    queue = QueueHttp(
        settings, backend, WatchTokens(secret, settings.watch_token_seconds), token_of, fail
    )
    OllamaHttp(settings, backend, metrics, queue.watch_headers).register(app)
    OpenAIHttp(settings, backend, metrics, queue.watch_headers).register(app)
    queue.register(app)
    AdminHttp(
        settings, backend, lambda request: token_of(request, allow_default=False), fail
    ).register(app)
    ServiceRoutes(settings, backend, metrics).register(app)
    ui.register(app)


class ServiceRoutes:
    """The gateway's own: ``GET /health``, ``GET /metrics``, ``GET /openapi.json``."""

    def __init__(
        self, settings: GatewaySettings, backend: Backend, metrics: GatewayMetrics
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = metrics

    def register(self, app: web.Application) -> None:
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_get("/openapi.json", self.openapi)

    async def health(self, request: web.Request) -> web.Response:
        services = await self.backend.health()
        fleet: dict[str, Any] = {}
        total_models = 0
        try:
            instances = await self.backend.instances()
            local = [s for s in instances if not s.config.external]
            healthy = [s for s in local if s.health == pool_pb2.INSTANCE_HEALTH_HEALTHY]
            fleet = {
                "instances": len(local),
                "healthy": len(healthy),
                "slots_per_model": sum(int(s.parallel) for s in healthy),
                "active": sum(int(s.active) for s in local),
            }
            total_models = len(views.catalogue(instances))
        except grpc.aio.AioRpcError:
            fleet = {"error": "the pool cannot be reached"}
        ok = all(state == "serving" for state in services.values())
        body = {
            "status": "healthy" if ok else "degraded",
            "timestamp": datetime.now(UTC).replace(tzinfo=None).isoformat(timespec="seconds"),
            "uptime_seconds": int(time.time() - self.backend.started_at),
            "concurrency": {
                "default_parallel": self.settings.default_parallel,
                "default_queue_limit": self.settings.default_queue_limit,
                "total_models": total_models,
                "memory": memory_now(),
            },
            "services": services,
            "fleet": fleet,
        }
        return json_response(body, 200 if ok else 503)

    async def openapi(self, request: web.Request) -> web.Response:
        return json_response(openapi_document())

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})


def _metrics_middleware(metrics: GatewayMetrics) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        metrics.in_flight.labels(route).inc()
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 499
            raise
        finally:
            metrics.in_flight.labels(route).dec()
            metrics.requests.labels(route, request.method, str(status)).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - started)

    return middleware


def _body_middleware(settings: GatewaySettings) -> Any:
    """Reads every request body before its handler runs, within the read timeout: a client
    that stalls mid-body gets 408 and its connection back instead of holding a handler
    (and a socket) for ever. Handlers read the body from memory afterwards. A stall in the
    headers is bounded by the server's keep-alive timeout (the same setting)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.body_exists:
            try:
                if request.content.is_eof():
                    await request.read()  # all of it arrived already: nothing to bound
                else:
                    await asyncio.wait_for(request.read(), settings.read_timeout_seconds)
            except TimeoutError:
                error = GatewayError(
                    408,
                    "timeout",
                    f"the request body did not arrive within {settings.read_timeout_seconds:g} s",
                    field="body",
                )
                response = path_error_response(request, error)
                response.force_close()
                return response
            except web.HTTPRequestEntityTooLarge:
                return path_error_response(
                    request,
                    GatewayError(
                        413,
                        "too_large",
                        f"the body is larger than {settings.max_body_bytes} bytes",
                        field="body",
                    ),
                )
        try:
            return await handler(request)
        except (web.HTTPException, asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as exc:  # a fault of ours: no internal text to the caller
            log.exception(
                "gateway_handler_failed", path=request.path, error_type=type(exc).__name__
            )
            return path_error_response(
                request, GatewayError(500, "internal", "internal error; it has been logged")
            )

    return middleware


def build_app(
    settings: GatewaySettings,
    backend: Backend | None = None,
    metrics: GatewayMetrics | None = None,
) -> web.Application:
    """The application; its backend starts and stops with it."""
    backend = backend or Backend(settings)
    metrics = metrics or GatewayMetrics()
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[_metrics_middleware(metrics), _body_middleware(settings)],
    )
    app[BACKEND] = backend
    app[METRICS] = metrics
    register_routes(app, settings, backend, metrics)

    async def start(_: web.Application) -> None:
        await backend.start()

    async def stop(_: web.Application) -> None:
        await backend.close()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app


def app_runner(app: web.Application, settings: GatewaySettings) -> web.AppRunner:
    """The runner of ``app`` with the gateway's connection settings."""
    return web.AppRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=settings.shutdown_grace_seconds,
        access_log=None,
        keepalive_timeout=settings.read_timeout_seconds,
        # After a 408 or 413 the unread rest of a body is drained this long at most.
        lingering_time=min(10.0, settings.read_timeout_seconds),
    )


async def start_listening(runner: web.AppRunner, settings: GatewaySettings) -> None:
    await runner.setup()
    host, port = split_listen(settings.listen)
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("gateway_listening", listen=settings.listen)


async def serve(settings: GatewaySettings) -> None:
    """Listen until SIGTERM / SIGINT; in-flight answers get the shutdown grace period."""
    runner = app_runner(build_app(settings), settings)
    await start_listening(runner, settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("gateway_stopping")
        await runner.cleanup()
