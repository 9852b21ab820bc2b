"""The audit log: who did what, when, with what outcome — admin actions and queue operations.

Each event is a structlog line at once (so log shipping has it even if Redis is away) and
an entry of a Redis stream, written in small batches off the hot path and readable through
the admin API. Admin actions of callers holding the admin role go to their own capped
stream (``usher:audit``); tenants' operations go to another (``usher:audit:activity``), so
no amount of ordinary traffic pushes an admin event out. Refused admin calls (anonymous,
bad token, no admin role) are never written one by one: they are counted and summarized
once per ``REFUSED_SUMMARY_SECONDS`` in the activity stream (and the log).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import grpc
import redis.asyncio as aioredis
from google.protobuf import text_format

from usher import keys
from usher.auth import Principal
from usher.grpc_types import Context, MethodHandler
from usher.ids import event_id_key
from usher.logs import get_logger

__all__ = ["REFUSED_SUMMARY_SECONDS", "AuditEntry", "AuditInterceptor", "AuditLog"]

log = get_logger("usher.audit")
MAXLEN = 100_000
FLUSH_SECONDS = 0.1
#: A flush writes up to this many events of a stream in one entry (one XADD for them all,
#: not one per event: a submit records one). MAXLEN counts entries, so a stream keeps up
#: to this many times as many events.
EVENTS_PER_ENTRY = 32
#: An event's id: the ``i``-th event of entry "ms-seq" is "ms-(seq * ID_STRIDE + i)", so
#: ids order as the events do and read as stream ids (ListAuditEvents' ``before_id``).
ID_STRIDE = 1024
#: Refused admin calls are summarized at most this often.
REFUSED_SUMMARY_SECONDS = 10.0
#: Outcomes of a call that was refused before it did anything.
_REFUSED = frozenset({"unauthenticated", "permission_denied"})


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
        self._pending: list[tuple[str, dict[str, str]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._refused: Counter[tuple[str, str, str]] = Counter()
        self._refused_since = 0.0

    def record(
        self,
        actor: str,
        action: str,
        target: str,
        outcome: str = "ok",
        detail: str = "",
        *,
        admin: bool = False,
    ) -> None:
        """One event; ``admin`` events (by a caller holding the admin role) go to the admin
        stream, the rest to the activity stream."""
        fields = {
            "at": str(int(time.time() * 1000)),
            "actor": actor,
            "action": action,
            "target": target,
            "outcome": outcome,
            "detail": detail,
        }
        log.info("audit", **{k: v for k, v in fields.items() if k != "at"})
        self._pending.append((keys.AUDIT if admin else keys.AUDIT_ACTIVITY, fields))
        self._schedule()

    def refused(self, actor: str, action: str, outcome: str) -> None:
        """A refused admin call: counted, and summarized once per interval."""
        if not self._refused:
            self._refused_since = time.monotonic()
        self._refused[(actor[:80], action, outcome)] += 1
        self._schedule()

    def _schedule(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(FLUSH_SECONDS)
        await self.flush()
        while self._refused:  # a summary is due when its interval is over
            elapsed = time.monotonic() - self._refused_since
            await asyncio.sleep(max(FLUSH_SECONDS, REFUSED_SUMMARY_SECONDS - elapsed))
            await self.flush()

    def _summarize_refused(self, force: bool) -> None:
        if not self._refused:
            return
        if not force and time.monotonic() - self._refused_since < REFUSED_SUMMARY_SECONDS:
            return  # _flush_soon comes back when the interval is over
        counts, self._refused = self._refused, Counter()
        total = sum(counts.values())
        top = ", ".join(f"{a} {act} {o} x{n}" for (a, act, o), n in counts.most_common(5))
        fields = {
            "at": str(int(time.time() * 1000)),
            "actor": "refused-callers",
            "action": "admin.refused",
            "target": "",
            "outcome": "refused",
            "detail": f"{total} refused admin calls: {top}"[:500],
        }
        log.warning("audit_refused_calls", calls=total, top=top)
        self._pending.append((keys.AUDIT_ACTIVITY, fields))

    async def flush(self, *, force: bool = False) -> None:
        self._summarize_refused(force)
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for stream, fields in _entries(pending):
                    pipe.xadd(stream, fields, maxlen=MAXLEN, approximate=True)  # type: ignore[arg-type]
                await pipe.execute()
        except Exception as exc:  # the log line above already holds the event
            log.warning("audit stream write failed", error=str(exc), events=len(pending))

    async def aclose(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.flush(force=True)

    async def recent(self, count: int, before_id: str = "") -> list[AuditEntry]:
        """The newest ``count`` events of both streams (before ``before_id``), newest first."""
        before = event_id_key(before_id) if before_id else None
        # The entry holding the event ``before_id`` names (its earlier events are wanted).
        upper = "+" if before is None else f"{before[0]}-{before[1] // ID_STRIDE}"
        merged: list[AuditEntry] = []
        for stream in (keys.AUDIT, keys.AUDIT_ACTIVITY):
            raw = cast(
                list[tuple[bytes, dict[bytes, bytes]]],
                await self.redis.xrevrange(stream, upper, "-", count=count + 1),
            )
            for entry_id, fields in raw:
                merged += _events(entry_id.decode(), fields)
        if before is not None:
            merged = [e for e in merged if (event_id_key(e.id) or (0, 0)) < before]
        return heapq.nlargest(count, merged, key=lambda e: event_id_key(e.id) or (0, 0))


def _entries(pending: list[tuple[str, dict[str, str]]]) -> list[tuple[str, dict[str, str]]]:
    """Stream entries for ``pending`` events: a lone event's fields as they are, several
    of one stream (EVENTS_PER_ENTRY at most) as a JSON list in the field "events"."""
    by_stream: dict[str, list[dict[str, str]]] = {}
    for stream, fields in pending:
        by_stream.setdefault(stream, []).append(fields)
    out = []
    for stream, events in by_stream.items():
        for start in range(0, len(events), EVENTS_PER_ENTRY):
            chunk = events[start : start + EVENTS_PER_ENTRY]
            out.append((stream, chunk[0] if len(chunk) == 1 else {"events": json.dumps(chunk)}))
    return out


def _events(entry_id: str, fields: dict[bytes, bytes]) -> list[AuditEntry]:
    """The events of one stream entry, each with its id (ID_STRIDE)."""
    raw = fields.get(b"events")
    events: list[dict[str, str]] = (
        json.loads(raw)
        if raw is not None
        else [{k.decode(): v.decode() for k, v in fields.items()}]
    )
    at, _, seq = entry_id.partition("-")
    return [
        AuditEntry(
            f"{at}-{int(seq) * ID_STRIDE + i}",
            int(text.get("at", "0")),
            text.get("actor", ""),
            text.get("action", ""),
            text.get("target", ""),
            text.get("outcome", ""),
            text.get("detail", ""),
        )
        for i, text in enumerate(events)
    ]


def _target(request: object) -> str:
    for name in ("id", "model", "slot_id"):
        value = getattr(request, name, "")
        if isinstance(value, str) and value:
            return value
    tenant = getattr(request, "tenant", None)
    organization = str(getattr(tenant, "organization", "")) if tenant is not None else ""
    if organization:
        return keys.tenant_id(organization, str(getattr(tenant, "user", "")))
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
                principal: Principal | None = self.authenticate(context.invocation_metadata())
            except Exception:
                principal = None
            outcome = "ok"
            try:
                return await inner(request, context)
            except Exception as exc:
                outcome = getattr(getattr(exc, "code", None), "name", "") or type(exc).__name__
                raise
            finally:
                outcome = outcome.lower()
                if principal is None or not principal.is_admin or outcome in _REFUSED:
                    actor = principal.tenant if principal is not None else "unauthenticated"
                    self.audit.refused(actor, action, outcome)
                else:
                    detail = text_format.MessageToString(request, as_one_line=True)[:500]
                    self.audit.record(
                        principal.tenant, action, _target(request), outcome, detail, admin=True
                    )

        return grpc.unary_unary_rpc_method_handler(
            audited,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
