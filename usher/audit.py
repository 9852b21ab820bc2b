"""The audit log: who did what, when, with what outcome — admin actions and queue operations.

Each event is a structlog line at once (so log shipping has it even if Redis is away) and
an entry of the ``usher:audit`` Redis stream, written in small batches off the hot path and
readable through the admin API.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import grpc
import redis.asyncio as aioredis
from google.protobuf import text_format

from usher import keys
from usher.auth import Principal
from usher.grpc_types import Context, MethodHandler
from usher.logs import get_logger

__all__ = ["AuditEntry", "AuditInterceptor", "AuditLog"]

log = get_logger("usher.audit")
MAXLEN = 100_000
FLUSH_SECONDS = 0.1


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: str
    at_ms: int
    actor: str
    action: str
    target: str
    outcome: str
    detail: str


class AuditLog:
    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client
        self._pending: list[dict[str, str]] = []
        self._flusher: asyncio.Task[None] | None = None

    def record(
        self, actor: str, action: str, target: str, outcome: str = "ok", detail: str = ""
    ) -> None:
        fields = {
            "at": str(int(time.time() * 1000)),
            "actor": actor,
            "action": action,
            "target": target,
            "outcome": outcome,
            "detail": detail,
        }
        log.info("audit", **{k: v for k, v in fields.items() if k != "at"})
        self._pending.append(fields)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(FLUSH_SECONDS)
        await self.flush()

    async def flush(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for fields in pending:
                    pipe.xadd(keys.AUDIT, fields, maxlen=MAXLEN, approximate=True)  # type: ignore[arg-type]
                await pipe.execute()
        except Exception as exc:  # the log line above already holds the event
            log.warning("audit stream write failed", error=str(exc), events=len(pending))

    async def aclose(self) -> None:
        if self._flusher is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.flush()

    async def recent(self, count: int, before_id: str = "") -> list[AuditEntry]:
        upper = f"({before_id}" if before_id else "+"
        raw = cast(
            list[tuple[bytes, dict[bytes, bytes]]],
            await self.redis.xrevrange(keys.AUDIT, upper, "-", count=count),
        )
        out = []
        for entry_id, fields in raw:
            text = {k.decode(): v.decode() for k, v in fields.items()}
            out.append(
                AuditEntry(
                    entry_id.decode(),
                    int(text.get("at", "0")),
                    text.get("actor", ""),
                    text.get("action", ""),
                    text.get("target", ""),
                    text.get("outcome", ""),
                    text.get("detail", ""),
                )
            )
        return out


def _target(request: object) -> str:
    for name in ("id", "model", "slot_id"):
        value = getattr(request, name, "")
        if isinstance(value, str) and value:
            return value
    tenant = getattr(request, "tenant", None)
    organization = str(getattr(tenant, "organization", "")) if tenant is not None else ""
    if organization:
        return f"{organization}/{getattr(tenant, 'user', '')}"
    config = getattr(request, "config", None)
    return str(getattr(config, "id", "")) if config is not None else ""


class AuditInterceptor(grpc.aio.ServerInterceptor):
    """Records every call to an admin service — who, which method, on what, the outcome —
    so each admin action is audited in one place, whichever service it belongs to."""

    def __init__(self, audit: AuditLog, authenticate: Callable[[Any], Principal]) -> None:
        self.audit = audit
        self.authenticate = authenticate

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[MethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> MethodHandler | None:
        handler = await continuation(handler_call_details)
        method = str(handler_call_details.method)
        service, _, name = method.rpartition("/")
        if handler is None or not service.endswith("AdminService") or handler.unary_unary is None:
            return handler
        inner = cast(Callable[[Any, Context], Awaitable[Any]], handler.unary_unary)
        action = "admin." + re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()

        async def audited(request: Any, context: Context) -> Any:
            try:
                actor = self.authenticate(context.invocation_metadata()).tenant
            except Exception:
                actor = "unauthenticated"
            outcome = "ok"
            try:
                return await inner(request, context)
            except Exception as exc:
                outcome = getattr(getattr(exc, "code", None), "name", "") or type(exc).__name__
                raise
            finally:
                detail = text_format.MessageToString(request, as_one_line=True)[:500]
                self.audit.record(actor, action, _target(request), outcome.lower(), detail)

        return grpc.unary_unary_rpc_method_handler(
            audited,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
