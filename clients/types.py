"""The SDK's public values: small frozen dataclasses converted from the protos.

Each keeps the proto it came from as ``raw`` for fields the dataclass does not carry. Enums
are ``IntEnum`` with the proto's numbers, so ``Priority.HIGH == request_pb2.PRIORITY_HIGH``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Self, TypeVar

from google.protobuf import duration_pb2, json_format, timestamp_pb2

from usher import messages
from usher.v1 import notifier_pb2, request_pb2, scheduler_pb2

__all__ = [
    "Badge",
    "Eta",
    "FallbackPolicy",
    "Priority",
    "QueueLevel",
    "Request",
    "RequestKind",
    "RequestState",
    "Result",
    "Route",
    "Submission",
    "Update",
    "UpdateKind",
    "Usage",
]


class _ProtoEnum(enum.IntEnum):
    """An IntEnum mirroring a proto enum whose names carry a common prefix."""

    @classmethod
    def parse(cls, value: str | int | Self) -> Self:
        """From a member, a number, or a name in any case with ``-`` or ``_``
        (``"after-timeout"``, ``"HIGH"``, ``"PRIORITY_HIGH"``)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, int):
            return cls(value)
        name = value.strip().upper().replace("-", "_")
        for member in cls:
            if name == member.name:
                return member
        for member in cls:  # the proto's full name: PRIORITY_HIGH
            if name.endswith("_" + member.name) and member.value != 0:
                return member
        choices = ", ".join(m.label for m in cls if m.value != 0)
        raise ValueError(f"{value!r} is not one of: {choices}")

    @property
    def label(self) -> str:
        """Lower-case name with dashes, as the CLI spells it: ``after-timeout``."""
        return self.name.lower().replace("_", "-")


class RequestKind(_ProtoEnum):
    UNSPECIFIED = request_pb2.REQUEST_KIND_UNSPECIFIED
    CHAT = request_pb2.REQUEST_KIND_CHAT
    GENERATE = request_pb2.REQUEST_KIND_GENERATE
    EMBED = request_pb2.REQUEST_KIND_EMBED


class RequestState(_ProtoEnum):
    UNSPECIFIED = request_pb2.REQUEST_STATE_UNSPECIFIED
    QUEUED = request_pb2.REQUEST_STATE_QUEUED
    RUNNING = request_pb2.REQUEST_STATE_RUNNING
    COMPLETED = request_pb2.REQUEST_STATE_COMPLETED
    FAILED = request_pb2.REQUEST_STATE_FAILED
    CANCELLED = request_pb2.REQUEST_STATE_CANCELLED
    EXPIRED = request_pb2.REQUEST_STATE_EXPIRED

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL_STATES


_TERMINAL_STATES = frozenset(
    {
        RequestState.COMPLETED,
        RequestState.FAILED,
        RequestState.CANCELLED,
        RequestState.EXPIRED,
    }
)


class Priority(_ProtoEnum):
    UNSPECIFIED = request_pb2.PRIORITY_UNSPECIFIED
    CRITICAL = request_pb2.PRIORITY_CRITICAL
    HIGH = request_pb2.PRIORITY_HIGH
    NORMAL = request_pb2.PRIORITY_NORMAL
    LOW = request_pb2.PRIORITY_LOW
    BATCH = request_pb2.PRIORITY_BATCH


class FallbackPolicy(_ProtoEnum):
    UNSPECIFIED = request_pb2.FALLBACK_POLICY_UNSPECIFIED
    NONE = request_pb2.FALLBACK_POLICY_NONE
    AFTER_TIMEOUT = request_pb2.FALLBACK_POLICY_AFTER_TIMEOUT
    LOCAL_ONLY = request_pb2.FALLBACK_POLICY_LOCAL_ONLY


class Route(_ProtoEnum):
    UNSPECIFIED = request_pb2.ROUTE_UNSPECIFIED
    LOCAL = request_pb2.ROUTE_LOCAL
    EXTERNAL = request_pb2.ROUTE_EXTERNAL


class UpdateKind(_ProtoEnum):
    UNSPECIFIED = notifier_pb2.UPDATE_KIND_UNSPECIFIED
    SNAPSHOT = notifier_pb2.UPDATE_KIND_SNAPSHOT
    QUEUED = notifier_pb2.UPDATE_KIND_QUEUED
    POSITION = notifier_pb2.UPDATE_KIND_POSITION
    RUNNING = notifier_pb2.UPDATE_KIND_RUNNING
    PROGRESS = notifier_pb2.UPDATE_KIND_PROGRESS
    COMPLETED = notifier_pb2.UPDATE_KIND_COMPLETED
    FAILED = notifier_pb2.UPDATE_KIND_FAILED
    CANCELLED = notifier_pb2.UPDATE_KIND_CANCELLED
    EXPIRED = notifier_pb2.UPDATE_KIND_EXPIRED
    REQUEUED = notifier_pb2.UPDATE_KIND_REQUEUED
    FALLBACK = notifier_pb2.UPDATE_KIND_FALLBACK
    CANCEL_REQUESTED = notifier_pb2.UPDATE_KIND_CANCEL_REQUESTED


_TERMINAL_KINDS = frozenset(
    {UpdateKind.COMPLETED, UpdateKind.FAILED, UpdateKind.CANCELLED, UpdateKind.EXPIRED}
)


class QueueLevel(_ProtoEnum):
    UNSPECIFIED = notifier_pb2.QUEUE_LEVEL_UNSPECIFIED
    AVAILABLE = notifier_pb2.QUEUE_LEVEL_AVAILABLE
    SHORT = notifier_pb2.QUEUE_LEVEL_SHORT
    MEDIUM = notifier_pb2.QUEUE_LEVEL_MEDIUM
    LONG = notifier_pb2.QUEUE_LEVEL_LONG


_E = TypeVar("_E", bound=_ProtoEnum)


def _enum(cls: type[_E], value: int) -> _E:
    try:
        return cls(value)
    except ValueError:  # a newer server's value: keep going
        return cls(0)


def _time(value: timestamp_pb2.Timestamp) -> datetime | None:
    if value.seconds == 0 and value.nanos == 0:
        return None
    return value.ToDatetime(tzinfo=UTC)


def _seconds(value: duration_pb2.Duration) -> float:
    return value.ToMilliseconds() / 1000


@dataclass(frozen=True, slots=True)
class Eta:
    """An estimate in seconds: when a queued request starts, or a running one finishes."""

    min_seconds: float
    max_seconds: float

    @property
    def phrase(self) -> str:
        """ "less than a minute", "2–3 minutes", ..."""
        return messages.wait_phrase(self.min_seconds, self.max_seconds)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    queue_wait_seconds: float
    processing_seconds: float
    tokens_per_second: float
    load_seconds: float

    @classmethod
    def from_proto(cls, usage: request_pb2.Usage) -> Usage:
        return cls(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            queue_wait_seconds=_seconds(usage.queue_wait),
            processing_seconds=_seconds(usage.processing),
            tokens_per_second=usage.tokens_per_second,
            load_seconds=_seconds(usage.load),
        )


@dataclass(frozen=True, slots=True)
class Result:
    text: str
    #: A chat's assistant message (with tool calls) in the model server's JSON shape.
    message: Mapping[str, Any] = field(hash=False)
    embeddings: tuple[tuple[float, ...], ...]
    done_reason: str
    served_by_model: str
    served_by_instance: str

    @classmethod
    def from_proto(cls, result: request_pb2.RequestResult) -> Result:
        return cls(
            text=result.text,
            message=json_format.MessageToDict(result.message) if result.HasField("message") else {},
            embeddings=tuple(tuple(e.values) for e in result.embeddings),
            done_reason=result.done_reason,
            served_by_model=result.served_by_model,
            served_by_instance=result.served_by_instance,
        )


@dataclass(frozen=True, slots=True)
class Request:
    """A request as the scheduler keeps it."""

    id: str
    model: str
    kind: RequestKind
    state: RequestState
    user: str
    organization: str
    priority: Priority
    fallback: FallbackPolicy
    route: Route
    #: 1-based place in the queue while QUEUED (positions can move when others arrive).
    position: int | None
    queue_length: int | None
    #: While QUEUED: time until it starts; while RUNNING: until it finishes.
    eta: Eta | None
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    deadline: datetime | None
    queue_timeout_seconds: float | None
    attempts: int
    error: str
    result: Result | None
    usage: Usage | None
    idempotency_key: str
    cancel_requested: bool
    labels: Mapping[str, str] = field(hash=False)
    raw: request_pb2.LlmRequest = field(repr=False, compare=False, hash=False)

    @classmethod
    def from_proto(cls, request: request_pb2.LlmRequest) -> Request:
        queued = request.HasField("position") and request.position.position > 0
        return cls(
            id=request.id,
            model=request.model,
            kind=_enum(RequestKind, request.kind),
            state=_enum(RequestState, request.state),
            user=request.tenant.user,
            organization=request.tenant.organization,
            priority=_enum(Priority, request.priority),
            fallback=_enum(FallbackPolicy, request.fallback_policy),
            route=_enum(Route, request.route),
            position=request.position.position if queued else None,
            queue_length=request.position.queue_length if queued else None,
            eta=Eta(_seconds(request.eta.min), _seconds(request.eta.max))
            if request.HasField("eta")
            else None,
            created_at=_time(request.created_at),
            started_at=_time(request.started_at),
            finished_at=_time(request.finished_at),
            deadline=_time(request.deadline),
            queue_timeout_seconds=_seconds(request.queue_timeout)
            if request.HasField("queue_timeout")
            else None,
            attempts=request.attempts,
            error=request.error,
            result=Result.from_proto(request.result) if request.HasField("result") else None,
            usage=Usage.from_proto(request.usage) if request.HasField("usage") else None,
            idempotency_key=request.idempotency_key,
            cancel_requested=request.cancel_requested,
            labels=dict(request.labels),
            raw=request,
        )

    @property
    def text(self) -> str:
        """The generated text ("" until COMPLETED, and for embeddings)."""
        return self.result.text if self.result is not None else ""

    @property
    def is_terminal(self) -> bool:
        return self.state.is_terminal

    @property
    def processing_seconds(self) -> float | None:
        if self.usage is not None and self.usage.processing_seconds > 0:
            return self.usage.processing_seconds
        if self.started_at is not None and self.finished_at is not None:
            return max(0.0, (self.finished_at - self.started_at).total_seconds())
        return None

    def status_message(self) -> str:
        """The sentence a person waiting should see, e.g. "You are #3 of 7 in the queue •
        Estimated wait: 2–3 minutes": the Notifier's own words (``usher.messages``)."""
        return messages.request_message(self.raw)


@dataclass(frozen=True, slots=True)
class Submission:
    """What Submit answered: the request, and whether it was shared or replayed."""

    request: Request
    #: Attached to an identical live deterministic request instead of queueing a new one.
    deduplicated: bool
    #: The idempotency key matched an earlier Submit (a retry): the original request.
    replayed: bool
    raw: scheduler_pb2.SubmitResponse = field(repr=False, compare=False, hash=False)

    @property
    def id(self) -> str:
        return self.request.id

    @classmethod
    def from_proto(cls, response: scheduler_pb2.SubmitResponse) -> Submission:
        return cls(
            request=Request.from_proto(response.request),
            deduplicated=response.deduplicated,
            replayed=response.replayed,
            raw=response,
        )


@dataclass(frozen=True, slots=True)
class Update:
    """One change in a watched request's life."""

    kind: UpdateKind
    #: Resume token; "" for position updates (they are recomputed, not replayed).
    event_id: str
    request: Request
    #: What to show the person waiting.
    message: str
    #: New output since the previous update (a SNAPSHOT carries all output so far).
    text_delta: str
    completion_tokens: int
    #: Estimated fraction of the output produced, 0..1.
    progress: float
    at: datetime | None
    raw: notifier_pb2.WatchResponse = field(repr=False, compare=False, hash=False)

    @classmethod
    def from_proto(cls, response: notifier_pb2.WatchResponse) -> Update:
        return cls(
            kind=_enum(UpdateKind, response.kind),
            event_id=response.event_id,
            request=Request.from_proto(response.request),
            message=response.message,
            text_delta=response.text_delta,
            completion_tokens=response.completion_tokens,
            progress=response.progress,
            at=_time(response.at),
            raw=response,
        )

    @property
    def is_terminal(self) -> bool:
        """The last update of a watch: the request completed, failed, was cancelled or
        expired (the first update of a watch on a finished request is one of these)."""
        return self.kind in _TERMINAL_KINDS


@dataclass(frozen=True, slots=True)
class Badge:
    """How busy a model's queue is, for a model picker."""

    model: str
    queued: int
    #: Running on the fleet's slots (of capacity).
    running: int
    capacity: int
    #: Estimated wait of a request submitted now.
    wait: Eta
    level: QueueLevel
    #: e.g. "llama3.2 (Available now)", "qwq (Queue full - 5+ min wait)".
    label: str
    suggested_model: str
    suggestion: str
    queue_full: bool
    raw: notifier_pb2.QueueBadge = field(repr=False, compare=False, hash=False)
    #: Running at the external provider (no slot taken, so not in running).
    external_running: int = 0

    @classmethod
    def from_proto(cls, badge: notifier_pb2.QueueBadge) -> Badge:
        return cls(
            model=badge.model,
            queued=badge.queued,
            running=badge.running,
            capacity=badge.capacity,
            wait=Eta(_seconds(badge.wait.min), _seconds(badge.wait.max)),
            level=_enum(QueueLevel, badge.level),
            label=badge.label,
            suggested_model=badge.suggested_model,
            suggestion=badge.suggestion,
            queue_full=badge.queue_full,
            raw=badge,
            external_running=badge.external_running,
        )
