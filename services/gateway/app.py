"""The gateway's aiohttp application: Ollama- and OpenAI-compatible routes, the Guard
Proxy's queue and ops endpoints, and ``/metrics``.

Every model request is Submitted to the Scheduler and its output read from the Notifier
(``flow.RequestFlow``); nothing here queues or schedules. A streamed answer's headers go
out as soon as the request is queued (with ``X-Usher-Request-Id`` and a watch token), and an
OpenAI stream carries a keepalive comment while it waits, so proxies do not cut it; later
errors arrive in the stream as Ollama and OpenAI send them. A non-streamed answer's
headers come with the answer (``X-Usher-Queue-Wait-Ms`` too). A client that disconnects,
streaming or not, queued or running, has its request cancelled. Status streams, cancel,
switch, the page and the operator panel live in ``queue_http``, ``admin_http`` and ``ui``.

Routes:

* Ollama: ``GET|HEAD /``, ``GET /api/version``, ``GET /api/tags``, ``GET /api/ps``,
  ``POST /api/show``, ``POST /api/chat``, ``/api/generate``, ``/api/embed``,
  ``/api/embeddings``, ``/api/pull`` (admin: onto every instance, with progress);
  ``/api/push|create|copy|delete`` answer 501.
* OpenAI: ``POST /v1/chat/completions``, ``POST /v1/embeddings``, ``GET /v1/models``,
  ``GET /v1/models/{model}``.
* Ops: ``GET /queue/stats[?model=]``, ``GET /queue/memory``, ``GET /health``,
  ``POST /admin/queue/update``, ``POST /admin/queue/reset``, ``GET /metrics``.

Request headers: ``Authorization: Bearer <token>`` (the tenant; the default token when
absent and configured), ``X-Usher-Priority`` (critical|high|normal|low|batch),
``X-Usher-Fallback`` (none|after_timeout|local_only), ``X-Usher-Queue-Timeout`` and
``X-Usher-Deadline`` (seconds), ``Idempotency-Key``, ``traceparent``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
import psutil  # type: ignore[import-untyped]  # psutil ships no stubs
from aiohttp import web

from services.gateway import status, ui, views
from services.gateway import translation as tr
from services.gateway.admin_http import AdminHttp
from services.gateway.backend import Backend, bearer
from services.gateway.flow import Finished, RequestFlow, Started, Text, rpc_error
from services.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from services.gateway.openapi import openapi_document
from services.gateway.queue_http import QueueHttp
from services.gateway.settings import GatewaySettings, split_listen
from services.gateway.streams import SSE, Keepalive, open_event_stream
from services.gateway.watch_tokens import WatchTokens, derive_secret
from usher.logs import get_logger
from usher.modelservers import auto_parallel
from usher.v1 import pool_pb2, request_pb2, scheduler_pb2

__all__ = ["BACKEND", "METRICS", "Gateway", "app_runner", "build_app", "serve", "start_listening"]

log = get_logger(__name__)

NDJSON = "application/x-ndjson"
BACKEND = web.AppKey("backend", Backend)
METRICS = web.AppKey("metrics", GatewayMetrics)
#: A backstop: ``serve`` also has aiohttp cancel the handler of a dropped connection.
_DISCONNECT_POLL_SECONDS = 0.5
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Parser = Callable[[Mapping[str, Any]], tr.Parsed]


def _dumps(body: Any) -> str:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def json_response(
    body: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        text=_dumps(body),
        status=status,
        content_type="application/json",
        charset="utf-8",
        headers=dict(headers or {}),
    )


def _line(body: Any) -> bytes:
    return (_dumps(body) + "\n").encode()


def _event(body: Any) -> bytes:
    return f"data: {_dumps(body)}\n\n".encode()


async def _disconnected(request: web.Request) -> None:
    """Returns once the client's connection is gone."""
    while True:
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        await asyncio.sleep(_DISCONNECT_POLL_SECONDS)


@dataclass
class Exchange:
    """One HTTP request being answered."""

    request: web.Request
    api: tr.Api
    model: str = ""
    flow: RequestFlow | None = None
    response: web.StreamResponse | None = None

    @property
    def route(self) -> str:
        resource = self.request.match_info.route.resource
        return resource.canonical if resource is not None else "unmatched"


class Gateway:
    def __init__(self, settings: GatewaySettings, backend: Backend, metrics: GatewayMetrics):
        self.settings = settings
        self.backend = backend
        self.metrics = metrics
        # Unset: derived from the service credential, so every replica agrees.
        secret = settings.watch_secret.encode() or derive_secret(backend.pool_token)
        self.queue = QueueHttp(
            settings,
            backend,
            WatchTokens(secret, settings.watch_token_seconds),
            self._token,
            lambda request, error: self._error(Exchange(request, "ollama"), error),
        )

    def register(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/", self.root)
        r.add_get("/api/version", self.version)
        r.add_get("/api/tags", self.tags)
        r.add_get("/api/ps", self.ps)
        r.add_post("/api/show", self.show)
        r.add_post("/api/chat", self.ollama_chat)
        r.add_post("/api/generate", self.ollama_generate)
        r.add_post("/api/embed", self.ollama_embed)
        r.add_post("/api/embeddings", self.ollama_embeddings)
        r.add_post("/api/pull", self.ollama_pull)
        for name in ("push", "create", "copy", "delete"):
            r.add_route("*", f"/api/{name}", self.not_supported)
        r.add_post("/v1/chat/completions", self.openai_chat)
        r.add_post("/v1/completions", self.openai_text)
        r.add_post("/v1/embeddings", self.openai_embeddings)
        r.add_get("/v1/models", self.openai_models)
        r.add_get("/v1/models/{model:.+}", self.openai_model)
        r.add_get("/queue/stats", self.queue_stats)
        r.add_get("/queue/memory", self.queue_memory)
        r.add_get("/health", self.health)
        r.add_post("/admin/queue/update", self.admin_update)
        r.add_post("/admin/queue/reset", self.admin_reset)
        r.add_get("/metrics", self.prometheus)
        r.add_get("/openapi.json", self.openapi)
        self.queue.register(app)
        AdminHttp(
            self.settings,
            self.backend,
            lambda request: self._token(request, allow_default=False),
            lambda request, error: self._error(Exchange(request, "ollama"), error),
        ).register(app)
        ui.register(app)

    # -- plumbing ------------------------------------------------------------------------

    def _error(self, ex: Exchange, error: tr.GatewayError) -> web.Response:
        self.metrics.errors.labels(error.code).inc()
        error.with_model(ex.model)
        headers: dict[str, str] = {}
        retry_after = error.retry_after_header()
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        if ex.flow is not None and ex.flow.request_id:
            headers["X-Usher-Request-Id"] = ex.flow.request_id
        if error.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="usher"'
        if ex.api == "openai":
            return json_response(tr.openai_error_body(error), tr.openai_status(error), headers)
        return json_response(tr.ollama_error_body(error), error.status, headers)

    def _token(self, request: web.Request, *, allow_default: bool = True) -> str:
        scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and credential.strip():
            return credential.strip()
        if allow_default and self.settings.default_token:
            return self.settings.default_token
        if self.settings.open_access:
            return ""  # no credentials: the services admit the caller as local/anonymous
        raise tr.GatewayError(401, "unauthorized", "missing 'Authorization: Bearer <token>' header")

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise tr.GatewayError(
                413,
                "too_large",
                f"the body is larger than {self.settings.max_body_bytes} bytes",
                field="body",
            ) from None
        return tr.decode_json(raw)

    async def _start(self, ex: Exchange, parsed: tr.Parsed) -> RequestFlow:
        """Check, resolve the model, Submit; the flow is ready to be watched."""
        controls = tr.parse_controls(ex.request.headers)
        token = self._token(ex.request)
        resolved = await self.backend.resolve_model(parsed.model)
        if resolved is None:
            raise self._not_found(ex, parsed.model)
        parsed.submit.model = resolved
        tr.apply_controls(parsed.submit, controls, time.time())
        flow = RequestFlow(
            self.backend, token, parsed.submit, deadline_seconds=controls.deadline_seconds
        )
        ex.flow = flow
        await flow.submit()
        return flow

    def _not_found(self, ex: Exchange, model: str) -> tr.GatewayError:
        if ex.request.path == "/api/embeddings":
            message = f'model "{model}" not found, try pulling it first'
        else:
            message = f"model '{model}' not found"
        return tr.GatewayError(404, "model_not_found", message, field="model", model=model)

    async def _guard(
        self, ex: Exchange, work: Coroutine[Any, Any, web.StreamResponse]
    ) -> web.StreamResponse:
        """Run ``work``; if the client leaves first, stop it and cancel the request."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(_disconnected(ex.request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # aiohttp cancelled the handler: the client left
            task.cancel()
            self._left(ex)
            raise
        finally:
            gone.cancel()
        if task.done():
            try:
                return task.result()
            except ConnectionResetError:
                self._left(ex)
                return ex.response or web.Response(status=499)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionResetError):
            await task
        self._left(ex)
        return ex.response or web.Response(status=499)

    def _left(self, ex: Exchange) -> None:
        self.metrics.disconnects.labels(ex.route).inc()
        if ex.flow is not None:
            ex.flow.cancel_soon("the client disconnected")

    async def _open_stream(
        self, ex: Exchange, content_type: str, flow: RequestFlow
    ) -> web.StreamResponse:
        """Send a streamed answer's headers as soon as the request is queued: a proxy sees
        a response at once, and the client gets the request id and a watch token."""
        headers = {"X-Usher-Request-Id": flow.request_id}
        if flow.latest is not None:
            headers.update(self.queue.watch_headers(flow.latest))
        if content_type == SSE:
            response = await open_event_stream(ex.request, headers)
        else:
            response = web.StreamResponse(headers={"Content-Type": content_type, **headers})
            await response.prepare(ex.request)
        ex.response = response
        return response

    def _observe_wait(self, api: str, wait_ms: int) -> None:
        self.metrics.queue_wait.labels(api).observe(wait_ms / 1000)

    async def _finished(self, ex: Exchange, flow: RequestFlow) -> request_pb2.LlmRequest:
        """Wait for the request's end (non-streaming answers)."""
        async with contextlib.aclosing(flow.events()) as events:
            async for event in events:
                if isinstance(event, Started):
                    self._observe_wait(ex.api, event.queue_wait_ms)
                elif isinstance(event, Finished):
                    return event.request
        raise tr.GatewayError(502, "upstream_error", "the request ended without a result")

    def _headers(self, request: request_pb2.LlmRequest) -> dict[str, str]:
        return {
            "X-Usher-Request-Id": request.id,
            "X-Usher-Queue-Wait-Ms": str(tr.queue_wait_ms(request)),
        }

    async def _model_request(
        self,
        request: web.Request,
        api: tr.Api,
        parse: Parser,
        answer: Callable[[Exchange, tr.Parsed, RequestFlow], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        ex = Exchange(request, api)
        try:
            parsed = parse(await self._body(request))
            ex.model = parsed.model
            if parsed.shortcut:
                if await self.backend.resolve_model(parsed.model) is None:
                    raise self._not_found(ex, parsed.model)
                return json_response(
                    tr.ollama_shortcut_final(parsed.kind, parsed.model, parsed.shortcut)
                )
            flow = await self._start(ex, parsed)
        except tr.GatewayError as error:
            return self._error(ex, error)
        except grpc.aio.AioRpcError as exc:
            return self._error(ex, rpc_error(exc, ex.model))
        return await self._guard(ex, self._answer_or_error(ex, parsed, flow, answer))

    async def _answer_or_error(
        self,
        ex: Exchange,
        parsed: tr.Parsed,
        flow: RequestFlow,
        answer: Callable[[Exchange, tr.Parsed, RequestFlow], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        try:
            return await answer(ex, parsed, flow)
        except tr.GatewayError as error:
            return self._error(ex, error)

    # -- Ollama: models --------------------------------------------------------------------

    async def ollama_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._model_request(request, "ollama", tr.ollama_chat, self._ollama_text)

    async def ollama_generate(self, request: web.Request) -> web.StreamResponse:
        return await self._model_request(request, "ollama", tr.ollama_generate, self._ollama_text)

    async def ollama_embed(self, request: web.Request) -> web.StreamResponse:
        return await self._model_request(request, "ollama", tr.ollama_embed, self._embedding)

    async def ollama_embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._model_request(request, "ollama", tr.ollama_embeddings, self._embedding)

    async def _ollama_text(
        self, ex: Exchange, parsed: tr.Parsed, flow: RequestFlow
    ) -> web.StreamResponse:
        if not parsed.stream:
            done = await self._finished(ex, flow)
            body = tr.ollama_final(parsed.kind, parsed.model, done, stream=False)
            return json_response(body, headers=self._headers(done))
        response = await self._open_stream(ex, NDJSON, flow)
        try:
            async with contextlib.aclosing(flow.events()) as events:
                async for event in events:
                    if isinstance(event, Started):
                        self._observe_wait("ollama", event.queue_wait_ms)
                    elif isinstance(event, Text):
                        await response.write(
                            _line(tr.ollama_chunk(parsed.kind, parsed.model, event.text))
                        )
                    else:
                        final = tr.ollama_final(
                            parsed.kind, parsed.model, event.request, stream=True
                        )
                        await response.write(_line(final))
        except tr.GatewayError as error:
            # Headers are gone: Ollama reports a failure mid-stream as an error line.
            self.metrics.errors.labels(error.code).inc()
            await response.write(_line({"error": error.message, "code": error.code}))
        await response.write_eof()
        return response

    async def _embedding(
        self, ex: Exchange, parsed: tr.Parsed, flow: RequestFlow
    ) -> web.StreamResponse:
        done = await self._finished(ex, flow)
        body: dict[str, Any]
        if ex.api == "openai":
            body = tr.openai_embeddings_response(parsed.model, done, parsed.encoding_format)
        elif parsed.kind == "embeddings":
            body = tr.ollama_embeddings_response(done)
        else:
            body = tr.ollama_embed_response(parsed.model, done)
        return json_response(body, headers=self._headers(done))

    # -- Ollama: metadata ----------------------------------------------------------------

    async def root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running", content_type="text/plain")

    async def version(self, request: web.Request) -> web.Response:
        return json_response({"version": self.settings.ollama_version})

    async def _fleet(self, ex: Exchange) -> list[pool_pb2.InstanceStatus]:
        try:
            return await self.backend.instances()
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc) from None

    async def tags(self, request: web.Request) -> web.Response:
        ex = Exchange(request, "ollama")
        try:
            instances = await self._fleet(ex)
        except tr.GatewayError as error:
            return self._error(ex, error)
        metadata = await self.backend.tag_metadata(instances)
        return json_response(views.tags_body(instances, metadata))

    async def ps(self, request: web.Request) -> web.Response:
        ex = Exchange(request, "ollama")
        try:
            instances = await self._fleet(ex)
        except tr.GatewayError as error:
            return self._error(ex, error)
        metadata = await self.backend.tag_metadata(instances)
        return json_response(views.ps_body(instances, metadata))

    async def show(self, request: web.Request) -> web.Response:
        ex = Exchange(request, "ollama")
        try:
            body = await self._body(request)
            name = body.get("model") or body.get("name")
            if not isinstance(name, str) or not name.strip():
                raise tr.GatewayError(400, "invalid_request", tr.EMPTY_MODEL, field="model")
            ex.model = name
            instances = await self._fleet(ex)
            resolved = views.resolve_model(name, views.catalogue(instances))
            if resolved is None:
                raise self._not_found(ex, name)
        except tr.GatewayError as error:
            return self._error(ex, error)
        answer = await self.backend.show(resolved, {"verbose": bool(body.get("verbose"))})
        return json_response(answer or views.synthesized_show(resolved, instances))

    async def ollama_pull(self, request: web.Request) -> web.StreamResponse:
        """Ollama's pull, onto every local instance (PoolAdmin.PullModel; admins only):
        NDJSON progress lines in Ollama's shape, or one ``{"status": "success"}``."""
        ex = Exchange(request, "ollama")
        try:
            token = self._token(request, allow_default=False)
            body = await self._body(request)
            name = body.get("model") or body.get("name")
            if not isinstance(name, str) or not name.strip():
                raise tr.GatewayError(400, "invalid_request", tr.EMPTY_MODEL, field="model")
            ex.model = name.strip()
            call = self.backend.pool_admin.PullModel(
                pool_pb2.PullModelRequest(model=ex.model), metadata=bearer(token)
            )
            try:
                first = await call.read()
            except grpc.aio.AioRpcError as exc:
                raise rpc_error(exc, ex.model) from None
        except tr.GatewayError as error:
            return self._error(ex, error)
        if body.get("stream") is False:
            return await self._pull_result(ex, call)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        ex.response = response
        line = first
        try:
            while isinstance(line, pool_pb2.PullModelResponse):
                await response.write((json.dumps(_pull_line(line)) + "\n").encode())
                line = await call.read()
            await response.write(b'{"status":"success"}\n')
        except grpc.aio.AioRpcError as exc:
            await response.write((json.dumps({"error": exc.details()}) + "\n").encode())
        await response.write_eof()
        return response

    async def _pull_result(
        self,
        ex: Exchange,
        call: grpc.aio.UnaryStreamCall[pool_pb2.PullModelRequest, pool_pb2.PullModelResponse],
    ) -> web.Response:
        try:
            while await call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as exc:
            return self._error(ex, rpc_error(exc, ex.model))
        return json_response({"status": "success"})

    async def not_supported(self, request: web.Request) -> web.Response:
        return self._error(
            Exchange(request, "ollama"),
            tr.GatewayError(
                501,
                "not_implemented",
                f"{request.path} is not offered by the Usher gateway; "
                "manage models on the instances (the Pool places and loads them)",
            ),
        )

    # -- OpenAI --------------------------------------------------------------------------

    async def openai_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._model_request(request, "openai", tr.openai_chat, self._openai_chat)

    async def openai_text(self, request: web.Request) -> web.StreamResponse:
        return await self._model_request(
            request, "openai", tr.openai_text_completion, self._openai_text
        )

    async def openai_embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._model_request(request, "openai", tr.openai_embeddings, self._embedding)

    async def _openai_chat(
        self, ex: Exchange, parsed: tr.Parsed, flow: RequestFlow
    ) -> web.StreamResponse:
        frames = tr.OpenAIFrames(
            f"chatcmpl-{flow.request_id}", int(time.time()), parsed.model, parsed.include_usage
        )
        if not parsed.stream:
            done = await self._finished(ex, flow)
            body = tr.openai_completion(frames.completion_id, frames.created, parsed.model, done)
            return json_response(body, headers=self._headers(done))
        return await self._openai_stream(ex, flow, frames)

    async def _openai_text(
        self, ex: Exchange, parsed: tr.Parsed, flow: RequestFlow
    ) -> web.StreamResponse:
        """The legacy text completion: one object, or SSE pieces ending in ``[DONE]``."""
        frames = tr.OpenAIFrames(
            f"cmpl-{flow.request_id}",
            int(time.time()),
            parsed.model,
            parsed.include_usage,
            text_completion=True,
        )
        if not parsed.stream:
            done = await self._finished(ex, flow)
            body = tr.openai_text_completion_body(
                frames.completion_id, frames.created, parsed.model, done
            )
            return json_response(body, headers=self._headers(done))
        return await self._openai_stream(ex, flow, frames)

    async def _openai_stream(
        self, ex: Exchange, flow: RequestFlow, frames: tr.OpenAIFrames
    ) -> web.StreamResponse:
        """An SSE answer: headers at once, then (while queued) a comment every few seconds
        ("queued 3 of 7, about 2–3 minutes": the openai client ignores it, proxies see
        traffic), the model's pieces, the ending and ``[DONE]``; errors in-stream."""
        response = await self._open_stream(ex, SSE, flow)
        keepalive = Keepalive(
            response,
            self.settings.keepalive_seconds,
            lambda: status.sse_comment(status.queued_comment(flow.latest)),
        )
        try:
            async with contextlib.aclosing(flow.events()) as events:
                async for event in events:
                    if isinstance(event, Started):
                        keepalive.stop()
                        self._observe_wait("openai", event.queue_wait_ms)
                        frame = frames.opening()
                    elif isinstance(event, Text):
                        frame = [frames.text(event.text)]
                    else:
                        frame = frames.ending(event.request)
                    if frame:
                        await response.write(b"".join(_event(f) for f in frame))
            await response.write(b"data: [DONE]\n\n")
        except tr.GatewayError as error:
            self.metrics.errors.labels(error.code).inc()
            await response.write(_event(tr.openai_error_body(error)))
        finally:
            keepalive.stop()
        await response.write_eof()
        return response

    async def openai_models(self, request: web.Request) -> web.Response:
        ex = Exchange(request, "openai")
        try:
            instances = await self._fleet(ex)
        except tr.GatewayError as error:
            return self._error(ex, error)
        return json_response(views.openai_models_body(instances))

    async def openai_model(self, request: web.Request) -> web.Response:
        ex = Exchange(request, "openai")
        name = request.match_info["model"]
        try:
            instances = await self._fleet(ex)
            resolved = views.resolve_model(name, views.catalogue(instances))
            if resolved is None:
                raise self._not_found(ex, name)
        except tr.GatewayError as error:
            return self._error(ex, error)
        return json_response({"id": resolved, "object": "model", "created": 0, "owned_by": "usher"})

    # -- queue and ops -------------------------------------------------------------------

    async def _queue_stats(
        self, request: web.Request, models: list[str], wanted: str
    ) -> tuple[scheduler_pb2.GetQueueStatsResponse, bool]:
        """The Scheduler's statistics and whether the caller may see all of them: an admin's
        own token sees everything; anyone else sees the public part, read with the
        gateway's admin token when one is configured (else they are refused)."""
        try:
            own: str | None = self._token(request, allow_default=False)
        except tr.GatewayError:
            if not self.settings.admin_token:
                raise
            own = None
        for token, full in ((own, True), (self.settings.admin_token, False)):
            if not token:
                continue
            try:
                reply = await self.backend.admin.GetQueueStats(
                    scheduler_pb2.GetQueueStatsRequest(models=models),
                    metadata=bearer(token),
                    timeout=self.settings.rpc_timeout_seconds,
                )
                return reply, full
            except grpc.aio.AioRpcError as exc:
                denied = exc.code() == grpc.StatusCode.PERMISSION_DENIED
                if full and denied and self.settings.admin_token:
                    continue
                raise rpc_error(exc, wanted) from None
        raise tr.GatewayError(401, "unauthorized", "missing 'Authorization: Bearer <token>' header")

    async def queue_stats(self, request: web.Request) -> web.Response:
        ex = Exchange(request, "ollama")
        wanted = request.query.get("model", "").strip()
        try:
            models: list[str] = []
            if wanted:
                ex.model = wanted
                resolved = await self.backend.resolve_model(wanted)
                if resolved is None:
                    raise self._not_found(ex, wanted)
                models = [resolved]
            queues, full = await self._queue_stats(request, models, wanted)
        except tr.GatewayError as error:
            return self._error(ex, error)
        try:
            fleet = list(
                (
                    await self.backend.pool.GetModelStats(
                        pool_pb2.GetModelStatsRequest(models=models),
                        metadata=bearer(self.backend.pool_token),
                        timeout=self.settings.rpc_timeout_seconds,
                    )
                ).stats
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("pool_stats_unavailable", code=exc.code().name)
            fleet = []
        body = views.queue_stats_body(
            list(queues.stats),
            fleet,
            default_parallel=self.settings.default_parallel,
            default_queue_limit=self.settings.default_queue_limit,
            uptime_seconds=time.time() - self.backend.started_at,
        )
        if not full:
            body = views.public_queue_stats(body)
        if models:
            return json_response(body["models"].get(models[0], {"model": models[0]}))
        return json_response(body)

    @staticmethod
    def _memory() -> dict[str, Any]:
        memory = psutil.virtual_memory()
        return views.memory_body(
            int(memory.total),
            int(memory.available),
            int(memory.used),
            float(memory.percent),
            auto_parallel(int(memory.available)),
        )

    async def queue_memory(self, request: web.Request) -> web.Response:
        return json_response(self._memory())

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
                "memory": self._memory(),
            },
            "services": services,
            "fleet": fleet,
        }
        return json_response(body, 200 if ok else 503)

    async def admin_update(self, request: web.Request) -> web.Response:
        ex = Exchange(request, "ollama")
        try:
            token = self._token(request, allow_default=False)
            body = await self._body(request)
            model = body.get("model")
            if not isinstance(model, str) or not model.strip():
                raise tr.bad_request("model", "is required")
            ex.model = model
            resolved = await self.backend.resolve_model(model.strip()) or model.strip()
            update = scheduler_pb2.UpdateQueueConfigRequest(model=resolved)
            changed = False
            for name, field in (
                ("parallel_limit", "parallel"),
                ("queue_limit", "max_queue_size"),
                ("max_attempts", "max_attempts"),
            ):
                value = body.get(name)
                if value is None:
                    continue
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise tr.bad_request(name, "must be a positive integer")
                setattr(update, field, value)
                changed = True
            timeout = body.get("queue_timeout", body.get("request_timeout"))
            if timeout is not None:
                if (
                    isinstance(timeout, bool)
                    or not isinstance(timeout, int | float)
                    or timeout <= 0
                ):
                    raise tr.bad_request("queue_timeout", "must be a positive number of seconds")
                update.queue_timeout.FromMilliseconds(round(timeout * 1000))
                changed = True
            if not changed:
                raise tr.bad_request(
                    "body", "set parallel_limit, queue_limit, queue_timeout or max_attempts"
                )
            try:
                reply = await self.backend.admin.UpdateQueueConfig(
                    update, metadata=bearer(token), timeout=self.settings.rpc_timeout_seconds
                )
            except grpc.aio.AioRpcError as exc:
                raise rpc_error(exc, resolved) from None
        except tr.GatewayError as error:
            return self._error(ex, error)
        config = reply.config
        return json_response(
            {
                "status": "updated",
                "model": config.model,
                "parallel_limit": config.parallel,
                "queue_limit": config.max_queue_size,
                "queue_timeout": config.queue_timeout.ToMilliseconds() / 1000,
                "max_attempts": config.max_attempts,
                "note": "parallel_limit: requests of this model each instance runs at once "
                "(the Pool applies it within seconds)",
            }
        )

    async def admin_reset(self, request: web.Request) -> web.Response:
        ex = Exchange(request, "ollama")
        try:
            token = self._token(request, allow_default=False)
            raw = await request.read()
            body = tr.decode_json(raw) if raw.strip() else {}
            model = body.get("model")
            if model is not None and not isinstance(model, str):
                raise tr.bad_request("model", "must be a string")
            models = [await self.backend.resolve_model(model) or model] if model else []
            try:
                reply = await self.backend.admin.ResetQueueStats(
                    scheduler_pb2.ResetQueueStatsRequest(models=models),
                    metadata=bearer(token),
                    timeout=self.settings.rpc_timeout_seconds,
                )
            except grpc.aio.AioRpcError as exc:
                raise rpc_error(exc, model or "") from None
        except tr.GatewayError as error:
            return self._error(ex, error)
        return json_response(
            {
                "status": "reset",
                "models": list(reply.models),
                "scope": "shared",
                "note": "the counters (processed, rejected, failed, ...) restart from zero for "
                "every gateway and Scheduler; the averages behind wait estimates are kept",
            }
        )

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


def _error_response(request: web.Request, error: tr.GatewayError) -> web.Response:
    """An error in the shape of the API the path belongs to (OpenAI under /v1/)."""
    if request.path.startswith("/v1/"):
        return json_response(tr.openai_error_body(error), tr.openai_status(error))
    return json_response(tr.ollama_error_body(error), error.status)


def _body_middleware(settings: GatewaySettings) -> Any:
    """Reads every request body before its handler runs, within the read timeout: a client
    that stalls mid-body gets 408 and its connection back instead of holding a handler
    (and a socket) for ever. Handlers read the body from memory afterwards. A stall in the
    headers is bounded by the server's keep-alive timeout (the same setting)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.body_exists:
            try:
                await asyncio.wait_for(request.read(), settings.read_timeout_seconds)
            except TimeoutError:
                error = tr.GatewayError(
                    408,
                    "timeout",
                    f"the request body did not arrive within {settings.read_timeout_seconds:g} s",
                    field="body",
                )
                response = _error_response(request, error)
                response.force_close()
                return response
            except web.HTTPRequestEntityTooLarge:
                return _error_response(
                    request,
                    tr.GatewayError(
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
            return _error_response(
                request, tr.GatewayError(500, "internal", "internal error; it has been logged")
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
    Gateway(settings, backend, metrics).register(app)

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


def _pull_line(progress: pool_pb2.PullModelResponse) -> dict[str, Any]:
    """A pull progress line as Ollama writes it (empty fields left out); the instance's
    "success" is one of several, so it reads as that instance's."""
    status = progress.status
    if status == "success":
        status = f"success on {progress.instance}"
    line: dict[str, Any] = {"status": status}
    if progress.digest:
        line["digest"] = progress.digest
    if progress.total:
        line["total"] = progress.total
    if progress.completed:
        line["completed"] = progress.completed
    return line
