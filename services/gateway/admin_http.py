"""The operator's view over HTTP (the page's admin panel): queues, instances, loaded models
and recent dead letters in one read; pause, resume and drain a model's queue.

* ``GET /admin/overview`` → ``{"queues": [...], "instances": [...], "dead_letters": [...]}``
* ``POST /admin/queue/pause`` ``{"model", "paused": true|false}`` → PauseQueue
* ``POST /admin/queue/drain`` ``{"model", "reason"}`` → DrainQueue

Every call carries the caller's own token: the Scheduler's admin service refuses
non-admins (403). Instances are read from the Pool with the gateway's service identity,
only after the caller has proven to be an admin.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from aiohttp import web

from services.gateway import views
from services.gateway.backend import Backend, bearer
from services.gateway.bodies import decode_json
from services.gateway.errors import GatewayError, bad_request, rpc_error
from services.gateway.exchange import read_json
from services.gateway.queue_http import check_origin
from services.gateway.responses import dumps, json_response
from services.gateway.settings import GatewaySettings
from usher.v1 import pool_pb2, request_pb2, scheduler_pb2

__all__ = ["AdminHttp", "overview_body"]

TokenOf = Callable[[web.Request], str]
Fail = Callable[[web.Request, GatewayError], web.Response]
_DEAD_LETTERS_PER_MODEL = 10
_HEALTH = {pool_pb2.INSTANCE_HEALTH_HEALTHY: "healthy", pool_pb2.INSTANCE_HEALTH_UNHEALTHY: "down"}
_CIRCUIT = {
    pool_pb2.CIRCUIT_STATE_CLOSED: "closed",
    pool_pb2.CIRCUIT_STATE_OPEN: "open",
    pool_pb2.CIRCUIT_STATE_HALF_OPEN: "half-open",
}


def _seconds(duration: Any) -> float:
    return round(float(duration.ToMilliseconds()) / 1000, 3)


def overview_body(
    stats: Sequence[scheduler_pb2.QueueStats],
    instances: Sequence[pool_pb2.InstanceStatus],
    dead_letters: Sequence[request_pb2.LlmRequest],
) -> dict[str, Any]:
    """What the operator panel shows (pure)."""
    return {
        "queues": [
            {
                "model": s.config.model,
                "queued": s.queued,
                "running": s.running,
                "completed": s.completed,
                "failed": s.failed,
                "dead_letters": s.dead_letters,
                "paused": s.config.paused,
                "max_queue_size": s.config.max_queue_size,
                "avg_queue_wait_seconds": _seconds(s.avg_queue_wait),
            }
            for s in stats
        ],
        "instances": [
            {
                "id": i.config.id,
                "external": i.config.external,
                "health": _HEALTH.get(i.health, "unknown"),
                "circuit": _CIRCUIT.get(i.circuit, "unknown"),
                "draining": i.draining,
                "active": i.active,
                "parallel": i.parallel,
                "loaded": [m.name for m in i.loaded],
                "last_error": i.last_error,
            }
            for i in instances
        ],
        "dead_letters": [
            {
                "id": r.id,
                "model": r.model,
                "error": r.error,
                "attempts": r.attempts,
                "tenant": f"{r.tenant.organization}/{r.tenant.user}",
            }
            for r in dead_letters
        ],
    }


class AdminHttp:
    def __init__(
        self, settings: GatewaySettings, backend: Backend, token_of: TokenOf, fail: Fail
    ) -> None:
        self.settings = settings
        self.backend = backend
        self._token_of = token_of
        self._fail = fail

    def register(self, app: web.Application) -> None:
        app.router.add_get("/admin/overview", self.overview)
        app.router.add_post("/admin/queue/pause", self.pause)
        app.router.add_post("/admin/queue/drain", self.drain)
        app.router.add_post("/admin/queue/update", self.update)
        app.router.add_post("/admin/queue/reset", self.reset)

    async def _call(self, rpc: Callable[..., Awaitable[Any]], message: Any, token: str) -> Any:
        try:
            return await rpc(
                message, metadata=bearer(token), timeout=self.settings.rpc_timeout_seconds
            )
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, getattr(message, "model", "")) from None

    async def overview(self, request: web.Request) -> web.Response:
        try:
            check_origin(request)
            token = self._token_of(request)
            stats = (
                await self._call(
                    self.backend.admin.GetQueueStats, scheduler_pb2.GetQueueStatsRequest(), token
                )
            ).stats
            dead: list[request_pb2.LlmRequest] = []
            for item in stats:
                if item.dead_letters:
                    reply = await self._call(
                        self.backend.admin.ListDeadLetters,
                        scheduler_pb2.ListDeadLettersRequest(
                            model=item.config.model, page_size=_DEAD_LETTERS_PER_MODEL
                        ),
                        token,
                    )
                    dead.extend(reply.requests)
        except GatewayError as error:
            return self._fail(request, error)
        try:
            instances = await self.backend.instances()
        except grpc.aio.AioRpcError:
            instances = []
        body = overview_body(list(stats), instances, dead)
        body["models"] = sorted(views.catalogue(instances))
        return web.Response(text=dumps(body), content_type="application/json")

    async def _model_body(self, request: web.Request) -> tuple[str, dict[str, Any]]:
        body = decode_json(await request.read())
        model = body.get("model")
        if not isinstance(model, str) or not model.strip():
            raise bad_request("model", "is required")
        return model.strip(), body

    async def pause(self, request: web.Request) -> web.Response:
        try:
            check_origin(request)
            token = self._token_of(request)
            model, body = await self._model_body(request)
            paused = body.get("paused", True)
            if not isinstance(paused, bool):
                raise bad_request("paused", "must be true or false")
            reply = await self._call(
                self.backend.admin.PauseQueue,
                scheduler_pb2.PauseQueueRequest(model=model, paused=paused),
                token,
            )
        except GatewayError as error:
            return self._fail(request, error)
        return web.json_response({"model": reply.config.model, "paused": reply.config.paused})

    async def drain(self, request: web.Request) -> web.Response:
        try:
            check_origin(request)
            token = self._token_of(request)
            model, body = await self._model_body(request)
            reason = body.get("reason") or "drained by an operator"
            if not isinstance(reason, str):
                raise bad_request("reason", "must be a string")
            reply = await self._call(
                self.backend.admin.DrainQueue,
                scheduler_pb2.DrainQueueRequest(model=model, reason=reason),
                token,
            )
        except GatewayError as error:
            return self._fail(request, error)
        return web.json_response({"model": model, "drained": reply.drained})

    # -- limits and counters (the Guard Proxy's routes) ------------------------------------

    async def update(self, request: web.Request) -> web.Response:
        named = ""
        try:
            token = self._token_of(request)
            body = await read_json(request, self.settings.max_body_bytes)
            model = body.get("model")
            if not isinstance(model, str) or not model.strip():
                raise bad_request("model", "is required")
            named = model
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
                    raise bad_request(name, "must be a positive integer")
                setattr(update, field, value)
                changed = True
            timeout = body.get("queue_timeout", body.get("request_timeout"))
            if timeout is not None:
                if (
                    isinstance(timeout, bool)
                    or not isinstance(timeout, int | float)
                    or timeout <= 0
                ):
                    raise bad_request("queue_timeout", "must be a positive number of seconds")
                update.queue_timeout.FromMilliseconds(round(timeout * 1000))
                changed = True
            if not changed:
                raise bad_request(
                    "body", "set parallel_limit, queue_limit, queue_timeout or max_attempts"
                )
            try:
                reply = await self.backend.admin.UpdateQueueConfig(
                    update, metadata=bearer(token), timeout=self.settings.rpc_timeout_seconds
                )
            except grpc.aio.AioRpcError as exc:
                raise rpc_error(exc, resolved) from None
        except GatewayError as error:
            return self._fail(request, error.with_model(named))
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

    async def reset(self, request: web.Request) -> web.Response:
        try:
            token = self._token_of(request)
            raw = await request.read()
            body = decode_json(raw) if raw.strip() else {}
            model = body.get("model")
            if model is not None and not isinstance(model, str):
                raise bad_request("model", "must be a string")
            models = [await self.backend.resolve_model(model) or model] if model else []
            try:
                reply = await self.backend.admin.ResetQueueStats(
                    scheduler_pb2.ResetQueueStatsRequest(models=models),
                    metadata=bearer(token),
                    timeout=self.settings.rpc_timeout_seconds,
                )
            except grpc.aio.AioRpcError as exc:
                raise rpc_error(exc, model or "") from None
        except GatewayError as error:
            return self._fail(request, error)
        return json_response(
            {
                "status": "reset",
                "models": list(reply.models),
                "scope": "shared",
                "note": "the counters (processed, rejected, failed, ...) restart from zero for "
                "every gateway and Scheduler; the averages behind wait estimates are kept",
            }
        )
