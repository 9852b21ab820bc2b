"""People waiting over HTTP: submit, watch, cancel and switch a request; watch the queue
badges of a model picker. What the SDK does over gRPC, for browsers and plain HTTP clients.

Routes (all JSON unless said):

* ``POST /queue/requests``: an OpenAI-style chat body → Submit; answers 202 at once with the
  request's place, ETA and a watch token (header ``X-Usher-Watch-Token`` and a cookie for
  this request's path). The request stays queued when the caller goes away (unlike the
  compatible APIs, whose requests end with their connection).
* ``GET /queue/requests/{id}``: its status now.
* ``GET /queue/requests/{id}/events`` (Server-Sent Events) and ``/queue/requests/{id}/ws``
  (WebSocket, JSON text frames): every update Notifier.Watch carries; resume with
  ``Last-Event-ID`` or ``?last_event_id=``: nothing twice.
* ``DELETE /queue/requests/{id}`` cancels; ``POST /queue/requests/{id}/switch`` moves it
  to the external provider.
* ``POST /queue/watch-tokens``: ``{"request_id": ...}`` (the caller's own request) or
  ``{}`` (the badges) → a fresh watch token, e.g. when one expired.
* ``GET /queue/models/events`` (SSE) and ``/queue/models/ws``: badges (WatchQueues),
  ``?model=`` repeated or comma-separated to choose.

Authorization is the gRPC API's: the caller's ``Authorization: Bearer`` token goes to the
services, which allow the owner or an admin. A browser's EventSource cannot send headers:
it presents a watch token (``?watch_token=`` or the ``usher_watch`` cookie) that this
gateway signed for one request (or the badges) and checks itself, then watches with its
own service identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import grpc
import psutil  # type: ignore[import-untyped]  # psutil ships no stubs
from aiohttp import WSMsgType, web

from services.gateway import status, views
from services.gateway.backend import Backend, bearer
from services.gateway.bodies import decode_json
from services.gateway.controls import apply_controls, parse_controls
from services.gateway.errors import GatewayError, bad_request, model_not_found, rpc_error
from services.gateway.openai_shapes import openai_chat
from services.gateway.responses import dumps, json_response
from services.gateway.settings import GatewaySettings
from services.gateway.streams import Keepalive, open_event_stream
from services.gateway.watch_tokens import (
    QUEUES_SCOPE,
    InvalidWatchToken,
    WatchTokens,
    request_scope,
)
from usher import keys, messages
from usher.ids import is_event_id, is_request_id
from usher.logs import get_logger
from usher.modelservers import auto_parallel
from usher.v1 import notifier_pb2, pool_pb2, request_pb2, scheduler_pb2

__all__ = [
    "WATCH_COOKIE",
    "WATCH_HEADER",
    "Credential",
    "QueueHttp",
    "check_origin",
    "memory_now",
    "watch_cookie_path",
]

log = get_logger(__name__)
WATCH_HEADER = "X-Usher-Watch-Token"
WATCH_COOKIE = "usher_watch"
_RESUMABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
)
_MAX_RESUMES = 6
#: How soon a browser's EventSource reconnects after a break (the SSE ``retry`` field).
_RETRY_MS = 1000
K = notifier_pb2


class TokenOf(Protocol):
    """The gateway's reading of the caller's token (``Gateway._token``)."""

    def __call__(self, request: web.Request, *, allow_default: bool = True) -> str: ...


Fail = Callable[[web.Request, GatewayError], web.Response]


def watch_cookie_path(request_id: str) -> str:
    return f"/queue/requests/{request_id}"


@dataclass(frozen=True, slots=True)
class Credential:
    """What the gateway sends to the services for one stream."""

    token: str
    #: True when a watch token was presented: the gateway watches with its own identity.
    delegated: bool


def _cookie_values(request: web.Request, name: str) -> list[str]:
    """Every value of cookie ``name`` (several paths may each hold one)."""
    found: list[str] = []
    for header in request.headers.getall("Cookie", []):
        for part in header.split(";"):
            key, sep, value = part.strip().partition("=")
            if sep and key == name and value:
                found.append(value.strip('"'))
    return found


def check_origin(request: web.Request) -> None:
    """Refuse what another site's page sends from a browser (its ``Origin`` names another
    host): with a default token or in open mode no credential would stop it. Clients that
    are not browsers send no ``Origin``."""
    origin = request.headers.get("Origin")
    if not origin:
        return
    host = urlsplit(origin).netloc.lower()
    allowed = {request.host.lower(), request.headers.get("X-Forwarded-Host", "").lower()}
    if host not in allowed:
        raise GatewayError(403, "forbidden", "a request from another site's page is refused")


class QueueHttp:
    def __init__(
        self,
        settings: GatewaySettings,
        backend: Backend,
        tokens: WatchTokens,
        token_of: TokenOf,
        fail: Fail,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.tokens = tokens
        self._token_of = token_of
        self._fail = fail
        self._fleet_source: object = None
        self._fleet_view = status.NO_FLEET

    def register(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/queue/requests", self.submit)
        r.add_get("/queue/requests/{id}", self.get)
        r.add_delete("/queue/requests/{id}", self.cancel)
        r.add_post("/queue/requests/{id}/switch", self.switch)
        r.add_get("/queue/requests/{id}/events", self.request_events)
        r.add_get("/queue/requests/{id}/ws", self.request_socket)
        r.add_post("/queue/watch-tokens", self.watch_token)
        r.add_get("/queue/models/events", self.model_events)
        r.add_get("/queue/models/ws", self.model_socket)
        r.add_get("/queue/stats", self.queue_stats)
        r.add_get("/queue/memory", self.queue_memory)

    # -- credentials ---------------------------------------------------------------------

    def _bearer(self, request: web.Request) -> str:
        """The caller's own ``Authorization: Bearer`` token, "" when none was sent."""
        try:
            return self._token_of(request, allow_default=False)
        except GatewayError:
            return ""

    def _credential(self, request: web.Request, scope: str) -> Credential:
        """The caller's own token when sent; else a valid watch token for ``scope`` (the
        gateway then acts with its service identity); else the gateway's default."""
        own = self._bearer(request)
        if own:
            return Credential(own, delegated=False)
        presented = [request.query.get("watch_token", ""), *_cookie_values(request, WATCH_COOKIE)]
        reason = ""
        now = time.time()
        for candidate in filter(None, presented):
            try:
                self.tokens.verify(candidate, scope, now)
            except InvalidWatchToken as exc:
                reason = reason or str(exc)
                continue
            return Credential(self.backend.pool_token, delegated=True)
        if reason:
            raise GatewayError(401, "unauthorized", reason)
        return Credential(self._token_of(request), delegated=False)

    def _issue(
        self, request: web.Request, scope: str, tenant: str, cookie_path: str
    ) -> tuple[dict[str, Any], Callable[[web.StreamResponse], None]]:
        """A watch token for ``scope``: the body fields, and what puts it in the response's
        header and in a cookie sent back only to ``cookie_path``."""
        token, claims = self.tokens.issue(scope, tenant, time.time())
        secure = request.secure or request.headers.get("X-Forwarded-Proto", "") == "https"

        def attach(response: web.StreamResponse) -> None:
            response.headers[WATCH_HEADER] = token
            response.set_cookie(
                WATCH_COOKIE,
                token,
                path=cookie_path,
                max_age=int(self.tokens.ttl_seconds),
                httponly=True,
                samesite="Strict",
                secure=secure or None,
            )

        return {"watch_token": token, "watch_token_expires_at": claims.expires_at}, attach

    def watch_headers(self, request: request_pb2.LlmRequest) -> dict[str, str]:
        """The watch-token header for a request its caller just submitted."""
        tenant = keys.tenant_id(request.tenant.organization, request.tenant.user)
        token, _ = self.tokens.issue(request_scope(request.id), tenant, time.time())
        return {WATCH_HEADER: token}

    # -- one request ---------------------------------------------------------------------

    def _request_id(self, request: web.Request) -> str:
        request_id = request.match_info["id"]
        if not is_request_id(request_id):
            raise bad_request("id", f"{request_id[:40]!r} is not a request id")
        return request_id

    async def _get(self, request_id: str, token: str) -> request_pb2.LlmRequest:
        try:
            reply = await self.backend.scheduler.Get(
                scheduler_pb2.GetRequest(id=request_id),
                metadata=bearer(token),
                timeout=self.settings.rpc_timeout_seconds,
            )
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc) from None
        return reply.request

    async def _fleet(self) -> status.Fleet:
        """The fleet as the offers see it, from the backend's cached instance list (worked
        out once per list: every update of every stream asks)."""
        try:
            instances = await self.backend.instances()
        except grpc.aio.AioRpcError:
            return status.NO_FLEET
        if instances is not self._fleet_source:
            self._fleet_source, self._fleet_view = instances, status.fleet_of(instances)
        return self._fleet_view

    async def _view(self, request: request_pb2.LlmRequest) -> dict[str, Any]:
        body = status.request_json(request, fleet=await self._fleet(), now=time.time())
        body["message"] = messages.request_message(request)
        return body

    async def submit(self, request: web.Request) -> web.Response:
        model = ""
        try:
            check_origin(request)
            token = self._token_of(request)
            try:
                raw = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise bad_request("body", "is too large") from None
            parsed = openai_chat(decode_json(raw))
            model = parsed.model
            resolved = await self.backend.resolve_model(parsed.model)
            if resolved is None:
                raise model_not_found(model, request.path)
            parsed.submit.model = resolved
            apply_controls(parsed.submit, parse_controls(request.headers), time.time())
            try:
                reply = await self.backend.scheduler.Submit(
                    parsed.submit,
                    metadata=bearer(token),
                    timeout=self.settings.rpc_timeout_seconds,
                )
            except grpc.aio.AioRpcError as exc:
                raise rpc_error(exc, model) from None
        except GatewayError as error:
            return self._fail(request, error.with_model(model))
        queued = reply.request
        body = await self._view(queued)
        body["deduplicated"] = reply.deduplicated
        tenant = keys.tenant_id(queued.tenant.organization, queued.tenant.user)
        issued, attach = self._issue(
            request, request_scope(queued.id), tenant, watch_cookie_path(queued.id)
        )
        response = json_response({**body, **issued}, 202, {"X-Usher-Request-Id": queued.id})
        attach(response)
        return response

    async def get(self, request: web.Request) -> web.Response:
        try:
            found = await self._get(self._request_id(request), self._token_of(request))
        except GatewayError as error:
            return self._fail(request, error)
        return json_response(await self._view(found))

    async def _act(
        self, request: web.Request, rpc: Callable[..., Any], message: Any
    ) -> web.Response:
        """A Scheduler call on one request with the caller's own credential (never a
        watch token's: those only watch); answers the request's status after it."""
        try:
            check_origin(request)
            message.id = self._request_id(request)
            try:
                reply = await rpc(
                    message,
                    metadata=bearer(self._token_of(request)),
                    timeout=self.settings.rpc_timeout_seconds,
                )
            except grpc.aio.AioRpcError as exc:
                raise rpc_error(exc) from None
        except GatewayError as error:
            return self._fail(request, error)
        return json_response(await self._view(reply.request))

    async def cancel(self, request: web.Request) -> web.Response:
        return await self._act(
            request,
            self.backend.scheduler.Cancel,
            scheduler_pb2.CancelRequest(reason="cancelled by the user"),
        )

    async def switch(self, request: web.Request) -> web.Response:
        return await self._act(
            request, self.backend.scheduler.SwitchProvider, scheduler_pb2.SwitchProviderRequest()
        )

    async def watch_token(self, request: web.Request) -> web.Response:
        """A fresh watch token for the caller's own request, or for the badges."""
        try:
            check_origin(request)
            token = self._token_of(request)
            raw = await request.read()
            body = decode_json(raw) if raw.strip() else {}
            request_id = body.get("request_id")
            if request_id is None:
                tenant = await self._whoami(token)
                scope, path = QUEUES_SCOPE, "/queue/models"
            else:
                if not isinstance(request_id, str) or not is_request_id(request_id):
                    raise bad_request("request_id", "is not a request id")
                found = await self._get(request_id, token)  # owner or admin, else 403/404
                tenant = keys.tenant_id(found.tenant.organization, found.tenant.user)
                scope, path = request_scope(request_id), watch_cookie_path(request_id)
        except GatewayError as error:
            return self._fail(request, error)
        issued, attach = self._issue(request, scope, tenant, path)
        response = json_response({"scope": scope, **issued})
        attach(response)
        return response

    async def _whoami(self, token: str) -> str:
        """Authenticates ``token`` with the cheapest call every caller may make."""
        try:
            await self.backend.scheduler.List(
                scheduler_pb2.ListRequest(page_size=1),
                metadata=bearer(token),
                timeout=self.settings.rpc_timeout_seconds,
            )
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc) from None
        return ""

    # -- watching ------------------------------------------------------------------------

    async def _open_watch(self, request: web.Request) -> tuple[str, Credential, str] | web.Response:
        """Check a watch before any header goes out: bad input, 401, 403 and 404 are
        proper HTTP answers."""
        try:
            check_origin(request)  # a WebSocket handshake carries the page's Origin too
            request_id = self._request_id(request)
            credential = self._credential(request, request_scope(request_id))
            last = request.headers.get("Last-Event-ID") or request.query.get("last_event_id", "")
            if last and not is_event_id(last):
                raise bad_request("last_event_id", "is not an event id this service gave out")
            if not credential.delegated:
                await self._get(request_id, credential.token)  # owner or admin
        except GatewayError as error:
            return self._fail(request, error)
        return request_id, credential, last

    async def _updates(
        self, request_id: str, credential: Credential, last_event_id: str
    ) -> AsyncGenerator[notifier_pb2.WatchResponse, None]:
        """Notifier.Watch until the request ends, resumed after the last event on a break."""
        resumes = 0
        model = ""  # learnt from the first update: a resumed watch names it (no lookup)
        while True:
            call = self.backend.notifier.Watch(
                notifier_pb2.WatchRequest(id=request_id, last_event_id=last_event_id, model=model),
                metadata=bearer(credential.token),
            )
            try:
                async for update in call:
                    resumes = 0
                    model = update.request.model
                    if update.event_id:
                        last_event_id = update.event_id
                    yield update
                    if status.is_terminal(update.kind):
                        return
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _RESUMABLE or resumes >= _MAX_RESUMES:
                    raise rpc_error(exc) from None
            finally:
                call.cancel()
            resumes += 1
            if resumes > _MAX_RESUMES:
                raise GatewayError(502, "upstream_error", "the status stream ended early")
            await asyncio.sleep(min(2.0, 0.1 * 2**resumes))

    async def _bodies(
        self, request_id: str, credential: Credential, last: str
    ) -> AsyncGenerator[tuple[str | None, dict[str, Any]], None]:
        """(event id, JSON) per update, then (None, ``{}`` or the error) at the end."""
        end: dict[str, Any] = {}
        try:
            # Closed on every way out (a client that leaves cancels its handler), so the
            # Notifier stream ends with it.
            async with contextlib.aclosing(self._updates(request_id, credential, last)) as updates:
                async for update in updates:
                    body = status.update_json(update, fleet=await self._fleet(), now=time.time())
                    yield update.event_id, body
        except GatewayError as error:
            end = {"error": error.message, "code": error.code, "status": error.status}
        yield None, end

    async def request_events(self, request: web.Request) -> web.StreamResponse:
        opened = await self._open_watch(request)
        if isinstance(opened, web.Response):
            return opened
        response = await open_event_stream(request, {"X-Usher-Request-Id": opened[0]})
        await response.write(f"retry: {_RETRY_MS}\n\n".encode())
        with Keepalive(
            response, self.settings.keepalive_seconds, lambda: status.sse_comment("keepalive")
        ):
            async with contextlib.aclosing(self._bodies(*opened)) as bodies:
                async for event_id, body in bodies:
                    # The end is a named event the page listens for: do not reconnect.
                    frame = (
                        status.sse_event(body, event_id)
                        if event_id is not None
                        else status.sse_event(body, event="end")
                    )
                    await response.write(frame)
        await response.write_eof()
        return response

    async def request_socket(self, request: web.Request) -> web.StreamResponse:
        opened = await self._open_watch(request)
        if isinstance(opened, web.Response):
            return opened

        async def send(socket: web.WebSocketResponse) -> None:
            async with contextlib.aclosing(self._bodies(*opened)) as bodies:
                async for event_id, body in bodies:
                    ending = {"kind": "end", **body} if event_id is None else body
                    await socket.send_str(dumps(ending))

        return await self._socket(request, send)

    async def _socket(
        self,
        request: web.Request,
        send: Callable[[web.WebSocketResponse], Any],
    ) -> web.WebSocketResponse:
        """Run ``send`` on a WebSocket until it is done or the client closes."""
        socket = web.WebSocketResponse(heartbeat=self.settings.keepalive_seconds)
        await socket.prepare(request)
        sender = asyncio.ensure_future(send(socket))
        reader = asyncio.ensure_future(self._drain(socket))
        try:
            await asyncio.wait({sender, reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, reader):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await sender
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        await socket.close()
        return socket

    @staticmethod
    async def _drain(socket: web.WebSocketResponse) -> None:
        """Read (and ignore) what the client sends, until it closes."""
        async for message in socket:
            if message.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                return

    # -- badges --------------------------------------------------------------------------

    def _models(self, request: web.Request) -> list[str]:
        return [
            name.strip()
            for value in request.query.getall("model", [])
            for name in value.split(",")
            if name.strip()
        ]

    async def _badges(
        self, credential: Credential, models: list[str]
    ) -> AsyncGenerator[notifier_pb2.WatchQueuesResponse, None]:
        resumes = 0
        while True:
            call = self.backend.notifier.WatchQueues(
                notifier_pb2.WatchQueuesRequest(models=models), metadata=bearer(credential.token)
            )
            try:
                async for response in call:
                    resumes = 0
                    yield response
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _RESUMABLE or resumes >= _MAX_RESUMES:
                    raise rpc_error(exc) from None
            finally:
                call.cancel()
            resumes += 1
            await asyncio.sleep(min(2.0, 0.1 * 2**resumes))

    async def _first_badges(
        self, request: web.Request
    ) -> tuple[AsyncGenerator[notifier_pb2.WatchQueuesResponse, None], Any] | web.Response:
        """Open the badge stream and read its first message before answering, so a bad
        credential is a 401 rather than a broken stream."""
        try:
            check_origin(request)
            credential = self._credential(request, QUEUES_SCOPE)
            stream = self._badges(credential, self._models(request))
            first = await anext(stream)
        except GatewayError as error:
            return self._fail(request, error)
        return stream, first

    async def model_events(self, request: web.Request) -> web.StreamResponse:
        opened = await self._first_badges(request)
        if isinstance(opened, web.Response):
            return opened
        stream, first = opened
        async with contextlib.aclosing(stream):
            response = await open_event_stream(request)
            await response.write(f"retry: {_RETRY_MS}\n\n".encode())
            with Keepalive(
                response, self.settings.keepalive_seconds, lambda: status.sse_comment("keepalive")
            ):
                await response.write(status.sse_event(status.badges_json(first)))
                with contextlib.suppress(GatewayError):
                    async for badges in stream:
                        await response.write(status.sse_event(status.badges_json(badges)))
            await response.write_eof()
        return response

    async def model_socket(self, request: web.Request) -> web.StreamResponse:
        opened = await self._first_badges(request)
        if isinstance(opened, web.Response):
            return opened
        stream, first = opened

        async def send(socket: web.WebSocketResponse) -> None:
            await socket.send_str(dumps(status.badges_json(first)))
            with contextlib.suppress(GatewayError):
                async for badges in stream:
                    await socket.send_str(dumps(status.badges_json(badges)))

        async with contextlib.aclosing(stream):
            return await self._socket(request, send)

    # -- the queues' figures ---------------------------------------------------------------

    async def _queue_stats(
        self, request: web.Request, models: list[str], wanted: str
    ) -> tuple[scheduler_pb2.GetQueueStatsResponse, bool]:
        """The Scheduler's statistics and whether the caller may see all of them: an admin's
        own token sees everything; anyone else sees the public part, read with the
        gateway's admin token when one is configured (else they are refused)."""
        try:
            own: str | None = self._token_of(request, allow_default=False)
        except GatewayError:
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
        raise GatewayError(401, "unauthorized", "missing 'Authorization: Bearer <token>' header")

    async def queue_stats(self, request: web.Request) -> web.Response:
        wanted = request.query.get("model", "").strip()
        try:
            models: list[str] = []
            if wanted:
                resolved = await self.backend.resolve_model(wanted)
                if resolved is None:
                    raise model_not_found(wanted, request.path)
                models = [resolved]
            queues, full = await self._queue_stats(request, models, wanted)
        except GatewayError as error:
            return self._fail(request, error.with_model(wanted))
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

    async def queue_memory(self, request: web.Request) -> web.Response:
        return json_response(memory_now())


def memory_now() -> dict[str, Any]:
    """This machine's memory (``/queue/memory``, ``/health``) and the parallel slots it
    would give a model."""
    memory = psutil.virtual_memory()
    return views.memory_body(
        int(memory.total),
        int(memory.available),
        int(memory.used),
        float(memory.percent),
        auto_parallel(int(memory.available)),
    )
