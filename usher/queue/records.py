"""The request queue's records as Redis holds them, and as the API shows them.

The Scheduler writes these (services/scheduler/store.py, its Lua scripts) and the Notifier
reads them (usher/queue/reads.py): one schema both import, so neither reaches into the other.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from google.protobuf import timestamp_pb2

from usher import keys
from usher.queue import fairness
from usher.queue.eta import Estimate, ModelAverages, queued_eta
from usher.structs import duration_from_seconds
from usher.v1 import request_pb2

__all__ = [
    "COMPLETION_AVERAGES",
    "COMPLETION_COUNTERS",
    "QUEUED",
    "RUNNING",
    "TERMINAL_STATES",
    "ModelConfig",
    "QueueDefaults",
    "StoredRequest",
    "WrittenEvents",
    "decode",
    "eta_for",
    "model_figures",
    "pairs",
    "to_proto",
]

QUEUED = request_pb2.REQUEST_STATE_QUEUED
RUNNING = request_pb2.REQUEST_STATE_RUNNING
TERMINAL_STATES = frozenset(
    {
        request_pb2.REQUEST_STATE_COMPLETED,
        request_pb2.REQUEST_STATE_FAILED,
        request_pb2.REQUEST_STATE_CANCELLED,
        request_pb2.REQUEST_STATE_EXPIRED,
    }
)


@dataclass(frozen=True, slots=True)
class QueueDefaults:
    """Per-model limits used until an operator sets the model's own (UpdateQueueConfig)."""

    max_queue_size: int = 100
    queue_timeout_ms: int = 300_000
    max_attempts: int = 3
    lease_ms: int = 30_000
    parallel: int = 1
    result_ttl_seconds: int = 86_400
    #: How long a dead letter waits to be retried before it is deleted; 0 = for ever.
    dead_letter_retention_seconds: int = 7 * 86_400
    idempotency_ttl_seconds: int = 86_400
    priority_lead: float = fairness.DEFAULT_PRIORITY_LEAD
    default_output_tokens: float = 256.0
    #: After an enqueue, WAIT until this many replicas hold it (0 = answer at once, as
    #: Redis's asynchronous replication does); fewer within the timeout is UNAVAILABLE.
    wait_replicas: int = 0
    wait_timeout_ms: int = 1000


def decode(reply: bytes | str) -> str:
    """A reply as text. Our client keeps ``decode_responses=False``, so replies are bytes."""
    return reply.decode() if isinstance(reply, bytes) else reply


def _text(raw: dict[bytes, bytes], name: str, default: str = "") -> str:
    value = raw.get(name.encode())
    return default if value is None else value.decode()


def _int(raw: dict[bytes, bytes], name: str, default: int = 0) -> int:
    value = raw.get(name.encode())
    return default if value is None or value == b"" else int(float(value))


def _float(raw: dict[bytes, bytes], name: str, default: float = 0.0) -> float:
    value = raw.get(name.encode())
    return default if value is None or value == b"" else float(value)


def pairs(flat: Sequence[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


#: A model's figures of completed work that complete.lua keeps in its fairness hash (beside
#: the flows' tags it writes in the same call): the counts of the outcomes it records, and
#: the moving averages. The stats hash keeps the other counters, and these as they were
#: before they moved.
COMPLETION_COUNTERS = ("completed", "failed", "cancelled")
COMPLETION_AVERAGES = (
    "service_ms",
    "service_n",
    "service_var",
    "tokens_per_s",
    "output_tokens",
    "wait_ms",
)


def model_figures(stats: Mapping[bytes, bytes], moved: Sequence[bytes | None]) -> dict[str, float]:
    """A model's counters and averages: its stats hash (``stats``, as HGETALL reads it)
    with the figures of its fairness hash (``moved``: HMGET of COMPLETION_COUNTERS then
    COMPLETION_AVERAGES) added (counters) or in place (averages, once they are there)."""
    figures = {k.decode(): float(v) for k, v in stats.items()}
    names = COMPLETION_COUNTERS + COMPLETION_AVERAGES
    for name, value in zip(names, moved, strict=True):
        if value is None:
            continue
        if name in COMPLETION_COUNTERS:
            figures[name] = figures.get(name, 0.0) + float(value)
        else:
            figures[name] = float(value)
    return figures


@dataclass(frozen=True, slots=True)
class StoredRequest:
    """A request as Redis holds it (payload and result still serialized)."""

    id: str
    model: str
    kind: int
    state: int
    user: str
    organization: str
    priority: int
    fallback: int
    route: int
    created_ms: int
    started_ms: int
    finished_ms: int
    deadline_ms: int
    queue_timeout_ms: int
    attempts: int
    max_attempts: int
    error: str
    idempotency_key: str
    cancel_requested: bool
    labels: dict[str, str]
    traceparent: str
    payload: bytes
    result: bytes
    usage: bytes
    prompt_tokens: int
    cost: float
    lease_token: str
    #: Why it went to the external lane ("timeout", "switched", "unavailable").
    route_reason: str = ""
    #: The wait (ms) promised when it was queued; 0 when none was.
    promised_wait_ms: int = 0
    #: While a failed attempt's retry backoff runs: when it is back in line (ms); else 0.
    retry_at_ms: int = 0
    #: Its fair start tag (fairness.py), for the ETA.
    start: float = 0.0
    owners: frozenset[str] = frozenset()
    position: int = 0
    queue_length: int = 0

    @property
    def tenant(self) -> str:
        return keys.tenant_id(self.organization, self.user)

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def ended(
        self, state: int, finished_ms: int, error: str = "", result: bytes = b"", usage: bytes = b""
    ) -> StoredRequest:
        """The request as its completion (services/scheduler/lua/complete.lua) leaves it:
        ended in ``state``, with its result and usage (decrypted) where it has them."""
        return replace(
            self,
            state=state,
            finished_ms=finished_ms,
            error=error,
            result=result or self.result,
            usage=usage or self.usage,
            lease_token="",
            position=0,
            queue_length=0,
        )

    @classmethod
    def from_hash(
        cls,
        raw: dict[bytes, bytes],
        owners: frozenset[str] = frozenset(),
        position: int = 0,
        queue_length: int = 0,
    ) -> StoredRequest:
        return cls(
            id=_text(raw, "id"),
            model=_text(raw, "model"),
            kind=_int(raw, "kind"),
            state=_int(raw, "state"),
            user=_text(raw, "user"),
            organization=_text(raw, "org"),
            priority=_int(raw, "priority"),
            fallback=_int(raw, "fallback"),
            route=_int(raw, "route"),
            created_ms=_int(raw, "created_ms"),
            started_ms=_int(raw, "started_ms"),
            finished_ms=_int(raw, "finished_ms"),
            deadline_ms=_int(raw, "deadline_ms"),
            queue_timeout_ms=_int(raw, "queue_timeout_ms"),
            attempts=_int(raw, "attempts"),
            max_attempts=_int(raw, "max_attempts"),
            error=_text(raw, "error"),
            idempotency_key=_text(raw, "idem"),
            cancel_requested=_text(raw, "cancel") == "1",
            labels=json.loads(_text(raw, "labels", "{}")),
            traceparent=_text(raw, "traceparent"),
            payload=raw.get(b"payload", b""),
            result=raw.get(b"result", b""),
            usage=raw.get(b"usage", b""),
            prompt_tokens=_int(raw, "prompt_tokens"),
            cost=_float(raw, "cost"),
            lease_token=_text(raw, "lease_token"),
            route_reason=_text(raw, "route_reason"),
            promised_wait_ms=_int(raw, "promised_wait_ms"),
            retry_at_ms=_int(raw, "retry_at_ms"),
            start=_float(raw, "start"),
            owners=owners,
            position=position,
            queue_length=queue_length,
        )


@dataclass(frozen=True, slots=True)
class WrittenEvents:
    """Events one script call appended to a request's stream, as the model stream's reader
    reads them (each with its 'eid'), handed to a Notifier in the same process (``usher
    serve``) as soon as the script returns; the stream stays the record and is read too."""

    model: str
    request_id: str
    #: The id of the request's event before the first of these ("0-0": none).
    after: str
    #: (request stream entry id, fields) in order.
    events: tuple[tuple[str, dict[str, str]], ...]
    #: When the last one ends the request: its result and usage as stored, decrypted.
    result: bytes = b""
    usage: bytes = b""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model: str
    max_queue_size: int
    queue_timeout_ms: int
    max_attempts: int
    lease_ms: int
    parallel: int
    paused: bool = False
    #: Fallback policy of requests that name none; 0 = the Scheduler's default.
    fallback: int = 0

    @classmethod
    def from_hash(cls, model: str, raw: dict[bytes, bytes], d: QueueDefaults) -> ModelConfig:
        """A model's settings as its config hash holds them, ``d`` where it holds none."""
        return cls(
            model=model,
            max_queue_size=_int(raw, "max_queue_size", d.max_queue_size),
            queue_timeout_ms=_int(raw, "queue_timeout_ms", d.queue_timeout_ms),
            max_attempts=_int(raw, "max_attempts", d.max_attempts),
            lease_ms=_int(raw, "lease_ms", d.lease_ms),
            parallel=_int(raw, "parallel", d.parallel),
            paused=_int(raw, "paused") == 1,
            fallback=_int(raw, "fallback"),
        )


def _timestamp(ms: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


def eta_for(
    stored: StoredRequest, averages: ModelAverages, parallel: int, now_ms: int | None = None
) -> Estimate | None:
    """Until start while queued; until finish while running; None once finished."""
    if stored.state == QUEUED and stored.position > 0:
        flow = fairness.flow_key(stored.tenant, stored.priority)
        return queued_eta(stored.position, parallel, averages, stored.start, flow)
    if stored.state == RUNNING:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        elapsed = max(0.0, (now - stored.started_ms) / 1000)
        remaining = max(0.0, averages.service_seconds - elapsed)
        spread = averages.spread
        return Estimate(remaining * (1 - spread), remaining * (1 + spread))
    return None


def to_proto(
    stored: StoredRequest,
    averages: ModelAverages | None = None,
    parallel: int = 1,
    state_override: int | None = None,
) -> request_pb2.LlmRequest:
    state = stored.state if state_override is None else state_override
    message = request_pb2.LlmRequest(
        id=stored.id,
        model=stored.model,
        kind=stored.kind,  # type: ignore[arg-type]
        state=state,  # type: ignore[arg-type]
        tenant=request_pb2.Tenant(user=stored.user, organization=stored.organization),
        priority=stored.priority,  # type: ignore[arg-type]
        fallback_policy=stored.fallback,  # type: ignore[arg-type]
        route=stored.route,  # type: ignore[arg-type]
        attempts=stored.attempts,
        error=stored.error,
        idempotency_key=stored.idempotency_key,
        cancel_requested=stored.cancel_requested,
        labels=stored.labels,
        route_reason=stored.route_reason,
    )
    message.created_at.CopyFrom(_timestamp(stored.created_ms))
    if stored.started_ms:
        message.started_at.CopyFrom(_timestamp(stored.started_ms))
    if stored.finished_ms:
        message.finished_at.CopyFrom(_timestamp(stored.finished_ms))
    if stored.deadline_ms:
        message.deadline.CopyFrom(_timestamp(stored.deadline_ms))
    if stored.queue_timeout_ms:
        message.queue_timeout.FromMilliseconds(stored.queue_timeout_ms)
    if state == QUEUED and stored.retry_at_ms:
        message.retry_at.CopyFrom(_timestamp(stored.retry_at_ms))
    if state == QUEUED and stored.position > 0:
        message.position.position = stored.position
        message.position.queue_length = stored.queue_length
    if averages is not None and state_override is None:
        estimate = eta_for(stored, averages, parallel)
        if estimate is not None:
            message.eta.min.CopyFrom(duration_from_seconds(estimate.min_seconds))
            message.eta.max.CopyFrom(duration_from_seconds(estimate.max_seconds))
    if stored.result:
        message.result.ParseFromString(stored.result)
    if stored.usage:
        message.usage.ParseFromString(stored.usage)
    return message
