"""What a watcher is told, as pure functions: events → updates, queue numbers → badges.

The thresholds are the product's: available (a slot is free), short (1–2 waiting, under 2
minutes), medium (3–5, 2–5 minutes), long (more than 5, or over 5 minutes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from usher import messages
from usher.queue.eta import Estimate, ModelAverages, queued_eta
from usher.queue.records import QUEUED, RUNNING, TERMINAL_STATES, StoredRequest
from usher.v1 import notifier_pb2

__all__ = [
    "EVENT_KINDS",
    "BadgeInputs",
    "after_event",
    "badge",
    "ended_by",
    "is_terminal_kind",
    "level_for",
    "progress_fraction",
    "suggest",
]

K = notifier_pb2
#: Stream event type (written by the scheduler's scripts) → update kind.
EVENT_KINDS: Mapping[str, int] = {
    "queued": K.UPDATE_KIND_QUEUED,
    "running": K.UPDATE_KIND_RUNNING,
    "started": K.UPDATE_KIND_RUNNING,
    "tokens": K.UPDATE_KIND_PROGRESS,
    "completed": K.UPDATE_KIND_COMPLETED,
    "failed": K.UPDATE_KIND_FAILED,
    "cancelled": K.UPDATE_KIND_CANCELLED,
    "expired": K.UPDATE_KIND_EXPIRED,
    "requeued": K.UPDATE_KIND_REQUEUED,
    "fallback": K.UPDATE_KIND_FALLBACK,
    "cancel_requested": K.UPDATE_KIND_CANCEL_REQUESTED,
}
_TERMINAL = {
    K.UPDATE_KIND_COMPLETED,
    K.UPDATE_KIND_FAILED,
    K.UPDATE_KIND_CANCELLED,
    K.UPDATE_KIND_EXPIRED,
}
SHORT_MAX_QUEUED, MEDIUM_MAX_QUEUED = 2, 5
SHORT_MAX_SECONDS, MEDIUM_MAX_SECONDS = 120.0, 300.0


def after_event(stored: StoredRequest, fields: Mapping[str, str]) -> StoredRequest | None:
    """The request as an event left it, worked out from the request before the event and
    what the event says; None when the event does not say all it changed (its record must
    be read). Only the frequent changes that carry all they wrote: a claim ("running":
    the attempt and its start, written by services/scheduler/lua/claim.lua), a cancel
    asked of a running request ("cancel_requested", cancel.lua), and the model server's
    start of a running one ("started", progress.lua: it changes nothing in the record)."""
    kind = fields.get("type")
    if kind == "running" and stored.state == QUEUED:
        attempt, started = fields.get("attempt", ""), fields.get("ts", "")
        if not (attempt.isdigit() and started.isdigit()):
            return None
        return replace(
            stored,
            state=RUNNING,
            attempts=int(attempt),
            started_ms=int(started),
            position=0,
            queue_length=0,
        )
    if kind == "cancel_requested" and stored.state == RUNNING:
        return replace(stored, cancel_requested=True)
    if kind == "started" and stored.state == RUNNING:
        return stored
    return None


def ended_by(
    stored: StoredRequest, fields: Mapping[str, str], result: bytes, usage: bytes
) -> StoredRequest | None:
    """The request as a completion (services/scheduler/lua/complete.lua) left it, from the
    request before it, the event, and the result and usage its writer handed over with it;
    None when the event does not end the request."""
    state, finished = fields.get("state", ""), fields.get("ts", "")
    if not (state.isdigit() and finished.isdigit()) or int(state) not in TERMINAL_STATES:
        return None
    return stored.ended(int(state), int(finished), fields.get("error", ""), result, usage)


def is_terminal_kind(kind: int) -> bool:
    return kind in _TERMINAL


def progress_fraction(tokens: int, expected_tokens: float) -> float:
    """Fraction done from tokens so far; never claims 100% before the end."""
    if expected_tokens <= 0:
        return 0.0
    return min(0.99, tokens / expected_tokens)


@dataclass(frozen=True, slots=True)
class BadgeInputs:
    model: str
    queued: int
    #: Running on the fleet's slots (of capacity).
    running: int
    capacity: int
    averages: ModelAverages
    max_queue_size: int
    #: Running at the external provider: no slot taken.
    external_running: int = 0


def level_for(queued: int, free_slot: bool, wait: Estimate) -> int:
    if queued == 0 and free_slot:
        return K.QUEUE_LEVEL_AVAILABLE
    if queued > MEDIUM_MAX_QUEUED or wait.max_seconds > MEDIUM_MAX_SECONDS:
        return K.QUEUE_LEVEL_LONG
    if queued > SHORT_MAX_QUEUED or wait.max_seconds > SHORT_MAX_SECONDS:
        return K.QUEUE_LEVEL_MEDIUM
    return K.QUEUE_LEVEL_SHORT


def suggest(
    model: str, badges: Sequence[notifier_pb2.QueueBadge], external_alternative: str
) -> tuple[str, str]:
    """(suggested model, sentence) for a long queue: the least busy local model that is not
    long itself, else the external alternative."""
    calmer = [
        b
        for b in badges
        if b.model != model and b.level in (K.QUEUE_LEVEL_AVAILABLE, K.QUEUE_LEVEL_SHORT)
    ]
    if calmer:
        best = min(calmer, key=lambda b: (b.level, b.wait.max.ToMilliseconds(), b.model))
        return best.model, messages.suggestion_message(best.model)
    if external_alternative:
        return external_alternative, messages.suggestion_message(external_alternative)
    return "", ""


def badge(inputs: BadgeInputs) -> notifier_pb2.QueueBadge:
    capacity = max(inputs.capacity, 0)
    free_slot = capacity > inputs.running
    wait = (
        Estimate(0.0, 0.0)
        if inputs.queued == 0 and free_slot
        else queued_eta(inputs.queued + 1, max(capacity, 1), inputs.averages)
    )
    level = level_for(inputs.queued, free_slot, wait)
    full = inputs.queued >= inputs.max_queue_size
    label = messages.badge_label(
        inputs.model,
        inputs.queued,
        wait.min_seconds,
        wait.max_seconds,
        available=level == K.QUEUE_LEVEL_AVAILABLE,
        full=full,
        long_wait=level == K.QUEUE_LEVEL_LONG and wait.max_seconds > MEDIUM_MAX_SECONDS,
    )
    result = notifier_pb2.QueueBadge(
        model=inputs.model,
        queued=inputs.queued,
        running=inputs.running,
        capacity=capacity,
        level=level,  # type: ignore[arg-type]
        label=label,
        queue_full=full,
        external_running=inputs.external_running,
    )
    result.wait.min.FromMilliseconds(round(wait.min_seconds * 1000))
    result.wait.max.FromMilliseconds(round(wait.max_seconds * 1000))
    return result
