"""What every API's routes share over HTTP: one request being answered (``Exchange``) and
``ApiRoutes``, the base of ``OllamaHttp`` and ``OpenAIHttp``: the caller's token, the
body, Submit and the wait for the end, a streamed answer's headers, disconnects, and
errors in the API's shape.

A model request is Submitted to the Scheduler and its output read from the Notifier
(``flow.RequestFlow``); nothing here queues or schedules. A streamed answer's headers go
out as soon as the request is queued (with ``X-Usher-Request-Id`` and a watch token); a
non-streamed answer's come with the answer (``X-Usher-Queue-Wait-Ms`` too). A client that
disconnects, streaming or not, queued or running, has its request cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web

from services.gateway.backend import Backend
from services.gateway.bodies import Parsed, decode_json, queue_wait_ms
from services.gateway.controls import apply_controls, parse_controls
from services.gateway.errors import Api, GatewayError, error_response, model_not_found, rpc_error
from services.gateway.flow import Finished, RequestFlow, Started
from services.gateway.metrics import GatewayMetrics
from services.gateway.responses import json_response
from services.gateway.settings import GatewaySettings
from services.gateway.streams import SSE, open_event_stream
from usher.v1 import pool_pb2, request_pb2

__all__ = [
    "ApiRoutes",
    "Exchange",
    "Parser",
    "WatchHeaders",
    "caller_token",
    "error_answer",
    "read_json",
]

#: A backstop: ``serve`` also has aiohttp cancel the handler of a dropped connection.
_DISCONNECT_POLL_SECONDS = 0.5
Parser = Callable[[Mapping[str, Any]], Parsed]
#: The watch-token header for a request its caller just submitted (``QueueHttp``).
WatchHeaders = Callable[[request_pb2.LlmRequest], dict[str, str]]


def _disconnected(request: web.Request) -> bool:
    """Whether the client's connection is gone."""
    transport = request.transport
    return transport is None or transport.is_closing()


class _Departure:
    """Cancels ``task`` once its client's connection is gone (``gone``), looked at by a
    timer every _DISCONNECT_POLL_SECONDS: no task of its own per request."""

    def __init__(self, request: web.Request, task: asyncio.Task[Any]) -> None:
        self._request = request
        self._task = task
        self.gone = False
        self._timer = task.get_loop().call_later(_DISCONNECT_POLL_SECONDS, self._look)

    def _look(self) -> None:
        if _disconnected(self._request):
            self.gone = True
            self._task.cancel()
        else:
            self._timer = self._task.get_loop().call_later(_DISCONNECT_POLL_SECONDS, self._look)

    def stop(self) -> None:
        self._timer.cancel()


def caller_token(
    request: web.Request, settings: GatewaySettings, *, allow_default: bool = True
) -> str:
    """The caller's bearer token; else the default token (when allowed and configured);
    else "" in open mode; else a 401."""
    scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credential.strip():
        return credential.strip()
    if allow_default and settings.default_token:
        return settings.default_token
    if settings.open_access:
        return ""  # no credentials: the services admit the caller as local/anonymous
    raise GatewayError(401, "unauthorized", "missing 'Authorization: Bearer <token>' header")


async def read_json(request: web.Request, max_body_bytes: int) -> dict[str, Any]:
    """The request's body as a JSON object (413 when larger than allowed)."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise GatewayError(
            413,
            "too_large",
            f"the body is larger than {max_body_bytes} bytes",
            field="body",
        ) from None
    return decode_json(raw)


def error_answer(metrics: GatewayMetrics, ex: Exchange, error: GatewayError) -> web.Response:
    """``error`` as the exchange's API answers it (counted), with ``Retry-After``, the
    request id once there is one, and the challenge of a 401."""
    metrics.errors.labels(error.code).inc()
    error.with_model(ex.model)
    headers: dict[str, str] = {}
    retry_after = error.retry_after_header()
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    if ex.flow is not None and ex.flow.request_id:
        headers["X-Usher-Request-Id"] = ex.flow.request_id
    if error.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="usher"'
    return error_response(ex.api, error, headers)


@dataclass
class Exchange:
    """One HTTP request being answered."""

    request: web.Request
    api: Api
    model: str = ""
    flow: RequestFlow | None = None
    response: web.StreamResponse | None = None

    @property
    def route(self) -> str:
        resource = self.request.match_info.route.resource
        return resource.canonical if resource is not None else "unmatched"


class ApiRoutes:
    """The request flow both compatible APIs share; each subclass adds its route table."""

    #: The API this class answers for (its errors take that API's shape).
    api: Api

    def __init__(
        self,
        settings: GatewaySettings,
        backend: Backend,
        metrics: GatewayMetrics,
        watch_headers: WatchHeaders,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = metrics
        self._watch_headers = watch_headers

    def _error(self, ex: Exchange, error: GatewayError) -> web.Response:
        return error_answer(self.metrics, ex, error)

    def _token(self, request: web.Request, *, allow_default: bool = True) -> str:
        return caller_token(request, self.settings, allow_default=allow_default)

    async def _body(self, request: web.Request) -> dict[str, Any]:
        return await read_json(request, self.settings.max_body_bytes)

    async def _start(self, ex: Exchange, parsed: Parsed) -> RequestFlow:
        """Check, resolve the model, Submit; the flow is ready to be watched."""
        controls = parse_controls(ex.request.headers)
        token = self._token(ex.request)
        resolved = await self.backend.resolve_model(parsed.model)
        if resolved is None:
            raise model_not_found(parsed.model, ex.request.path)
        parsed.submit.model = resolved
        # An answer sent whole needs no token stream in the queue's store.
        parsed.submit.result_only = not parsed.stream
        apply_controls(parsed.submit, controls, time.time())
        flow = RequestFlow(
            self.backend, token, parsed.submit, deadline_seconds=controls.deadline_seconds
        )
        ex.flow = flow
        await flow.submit()
        return flow

    async def _guard(
        self, ex: Exchange, work: Coroutine[Any, Any, web.StreamResponse]
    ) -> web.StreamResponse:
        """Run ``work``; if the client leaves first, stop it and cancel the request. It runs
        in the handler's own task: the answer goes out as soon as it is ready, with no task
        to start and no wait to wake."""
        task = asyncio.current_task()
        assert task is not None
        if _disconnected(ex.request):
            work.close()
            self._left(ex)
            return ex.response or web.Response(status=499)
        departure = _Departure(ex.request, task)
        try:
            response = await work
        except asyncio.CancelledError:
            # The departure's cancel ends the work; any other (aiohttp cancelled the
            # handler: the client left) ends the handler too.
            if not departure.gone or task.uncancel() > 0:
                self._left(ex)
                raise
        except ConnectionResetError:
            pass
        else:
            if not departure.gone:
                return response
            task.uncancel()  # the work ended despite the departure's cancel
        finally:
            departure.stop()
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
            headers.update(self._watch_headers(flow.latest))
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
        async with contextlib.aclosing(flow.events(final_only=True)) as events:
            async for event in events:
                if isinstance(event, Started):
                    self._observe_wait(ex.api, event.queue_wait_ms)
                elif isinstance(event, Finished):
                    return event.request
        raise GatewayError(502, "upstream_error", "the request ended without a result")

    def _headers(self, request: request_pb2.LlmRequest) -> dict[str, str]:
        return {
            "X-Usher-Request-Id": request.id,
            "X-Usher-Queue-Wait-Ms": str(queue_wait_ms(request)),
        }

    def _shortcut_answer(self, parsed: Parsed) -> dict[str, Any]:
        """The answer to a request that needs no model run (``parsed.shortcut``: Ollama's
        load / unload); only an API whose parsers set a shortcut has one."""
        raise NotImplementedError(f"{self.api} requests have no shortcut")

    async def _model_request(
        self,
        request: web.Request,
        parse: Parser,
        answer: Callable[[Exchange, Parsed, RequestFlow], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        ex = Exchange(request, self.api)
        try:
            parsed = parse(await self._body(request))
            ex.model = parsed.model
            if parsed.shortcut:
                if await self.backend.resolve_model(parsed.model) is None:
                    raise model_not_found(parsed.model, request.path)
                return json_response(self._shortcut_answer(parsed))
            flow = await self._start(ex, parsed)
        except GatewayError as error:
            return self._error(ex, error)
        except grpc.aio.AioRpcError as exc:
            return self._error(ex, rpc_error(exc, ex.model))
        return await self._guard(ex, self._answer_or_error(ex, parsed, flow, answer))

    async def _answer_or_error(
        self,
        ex: Exchange,
        parsed: Parsed,
        flow: RequestFlow,
        answer: Callable[[Exchange, Parsed, RequestFlow], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        try:
            return await answer(ex, parsed, flow)
        except GatewayError as error:
            return self._error(ex, error)

    async def _fleet(self) -> list[pool_pb2.InstanceStatus]:
        try:
            return await self.backend.instances()
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc) from None
