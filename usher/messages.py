"""The words users see while they wait (pure): positions, wait ranges, progress.

Follows the product requirements: "You are #3 of 7 in the queue • Estimated wait: 2–3
minutes", "Processing is 80% complete • Almost ready!", "Your response is ready!
Processing took 45 seconds."
"""

from __future__ import annotations

import math

from usher.v1 import notifier_pb2, request_pb2

__all__ = [
    "EXTERNAL_PROCESSING",
    "LOCAL_PROCESSING",
    "LONG_QUEUE_LENGTH",
    "LONG_QUEUE_PROMPT",
    "TIMEOUT_PROMPT",
    "TIMEOUT_PROMPT_SHARE",
    "UNAVAILABLE_NOTICE",
    "badge_label",
    "duration_phrase",
    "fallback_prompt",
    "position_message",
    "progress_message",
    "queued_comment",
    "ready_message",
    "request_message",
    "retry_message",
    "running_phrase",
    "suggestion_message",
    "switch_offered",
    "wait_phrase",
]


def _unit(value: int, unit: str) -> str:
    return f"{value} {unit}" if value == 1 else f"{value} {unit}s"


def duration_phrase(seconds: float) -> str:
    """45 seconds, 1 minute, 3 minutes, 2 hours."""
    if seconds < 60:
        return _unit(max(1, round(seconds)), "second")
    if seconds < 3600:
        return _unit(round(seconds / 60), "minute")
    return _unit(round(seconds / 3600), "hour")


def wait_phrase(min_seconds: float, max_seconds: float) -> str:
    """A human range: "less than a minute", "2–3 minutes", "about 1 hour"."""
    low, high = sorted((max(0.0, min_seconds), max(0.0, max_seconds)))
    if high < 60:
        return "less than a minute"
    if high < 3600:
        lo, hi = max(1, math.floor(low / 60)), max(1, math.ceil(high / 60))
        return _unit(hi, "minute") if lo == hi else f"{lo}–{hi} minutes"
    lo, hi = max(1, math.floor(low / 3600)), math.ceil(high / 3600)
    return f"about {_unit(hi, 'hour')}" if lo == hi else f"{lo}–{hi} hours"


def position_message(
    position: int, queue_length: int, min_seconds: float, max_seconds: float
) -> str:
    return (
        f"You are #{position} of {queue_length} in the queue • "
        f"Estimated wait: {wait_phrase(min_seconds, max_seconds)}"
    )


def progress_message(fraction: float) -> str:
    percent = max(0, min(100, round(fraction * 100)))
    if percent >= 80:
        return f"Processing is {percent}% complete • Almost ready!"
    return f"Processing is {percent}% complete"


def ready_message(processing_seconds: float) -> str:
    return f"Your response is ready! Processing took {duration_phrase(processing_seconds)}."


#: The product's fallback prompts (offered only when the request may leave the local fleet).
LONG_QUEUE_LENGTH = 8
LONG_QUEUE_PROMPT = (
    f"Queue is longer than usual ({LONG_QUEUE_LENGTH}+ requests). "
    "Switch to external provider for faster results?"
)
TIMEOUT_PROMPT = (
    "Local processing is taking longer than expected. "
    "Would you like to use an external provider instead?"
)
UNAVAILABLE_NOTICE = "Local models are temporarily unavailable. Switching to external provider."
LOCAL_PROCESSING = "Your request is now being processed by the local AI model"
EXTERNAL_PROCESSING = "Your request is now being processed by an external provider"
_TIMEOUT_NOTICE = (
    "Local processing is taking longer than expected. Switching to an external provider."
)
#: Why a queued request is on its way to the external provider → what its owner is told.
_EXTERNAL_NOTICES = {
    "unavailable": UNAVAILABLE_NOTICE,
    "switched": "Switching to an external provider, as you asked.",
    "timeout": _TIMEOUT_NOTICE,
}


def badge_label(
    model: str,
    queued: int,
    min_seconds: float,
    max_seconds: float,
    *,
    available: bool,
    full: bool,
    long_wait: bool,
) -> str:
    """A model picker's label: "llama3.2 (Available now)", "qwq (Queue full - 2–3 minutes
    wait)", "qwq (8 in queue - 6+ min wait)" (a long wait), "mistral (2 in queue)"."""
    if available:
        return f"{model} (Available now)"
    if full:
        return f"{model} (Queue full - {wait_phrase(min_seconds, max_seconds)} wait)"
    if long_wait:
        return f"{model} ({queued} in queue - {round(max_seconds / 60)}+ min wait)"
    return f"{model} ({queued} in queue)"


def running_phrase(running: int, capacity: int, external_running: int = 0) -> str:
    """A badge's use of the fleet: "1/2 running", and the external provider's apart (it
    takes no slot): "1/1 running +1 external"."""
    phrase = f"{running}/{capacity} running"
    return f"{phrase} +{external_running} external" if external_running > 0 else phrase


def retry_message(attempts: int) -> str:
    """A request waiting out the backoff after a failed attempt (queued again, no place in
    line yet)."""
    return f"Attempt {attempts} did not complete • Your request will be retried in a moment"


def suggestion_message(model: str) -> str:
    """A model picker's hint when another model (or the external provider) is quicker."""
    return f"Consider {model} for faster results"


#: Share of its queue timeout a request may wait before the "taking longer" prompt.
TIMEOUT_PROMPT_SHARE = 0.5


def switch_offered(request: request_pb2.LlmRequest, external_available: bool) -> bool:
    """The user may still move this request to the external provider."""
    return (
        external_available
        and request.state == request_pb2.REQUEST_STATE_QUEUED
        and request.route != request_pb2.ROUTE_EXTERNAL
        and request.fallback_policy != request_pb2.FALLBACK_POLICY_LOCAL_ONLY
    )


def fallback_prompt(request: request_pb2.LlmRequest, external_available: bool, now: float) -> str:
    """The product's prompt for this moment, or "": a wait past half of what the queue
    allows, a long queue (8+ requests), or (already on its way out) the switch notice."""
    if (
        request.route == request_pb2.ROUTE_EXTERNAL
        and request.state == request_pb2.REQUEST_STATE_QUEUED
    ):
        return _EXTERNAL_NOTICES.get(request.route_reason, UNAVAILABLE_NOTICE)
    if not switch_offered(request, external_available):
        return ""
    created = request.created_at.ToMilliseconds() if request.HasField("created_at") else 0
    waited = max(0.0, now - created / 1000) if created else 0.0
    allowed = request.queue_timeout.ToMilliseconds() / 1000
    if allowed > 0 and waited >= allowed * TIMEOUT_PROMPT_SHARE:
        return TIMEOUT_PROMPT
    if request.position.queue_length >= LONG_QUEUE_LENGTH:
        return LONG_QUEUE_PROMPT
    return ""


def queued_comment(request: request_pb2.LlmRequest | None) -> str:
    """What a queued stream's keepalive comment says: ``queued 3 of 7, about 2–3 minutes``
    (``queued`` before the place is known, ``waiting`` when not queued)."""
    if request is None or request.state != request_pb2.REQUEST_STATE_QUEUED:
        return "waiting"
    if not request.position.position:
        return "queued"
    wait = wait_phrase(
        request.eta.min.ToMilliseconds() / 1000, request.eta.max.ToMilliseconds() / 1000
    )
    return f"queued {request.position.position} of {request.position.queue_length}, about {wait}"


def request_message(request: request_pb2.LlmRequest, kind: int = 0, fraction: float = 0.0) -> str:
    """The sentence for a request's current status."""
    state = request.state
    if kind == notifier_pb2.UPDATE_KIND_FALLBACK and request.route == request_pb2.ROUTE_EXTERNAL:
        # Why it left the local fleet, even when it already runs by the time this is read.
        return _EXTERNAL_NOTICES.get(request.route_reason, _TIMEOUT_NOTICE)
    if state == request_pb2.REQUEST_STATE_QUEUED:
        if request.HasField("retry_at"):
            return retry_message(request.attempts)
        if request.route == request_pb2.ROUTE_EXTERNAL:
            return _EXTERNAL_NOTICES.get(request.route_reason, _TIMEOUT_NOTICE)
        if request.position.position:
            return position_message(
                request.position.position,
                request.position.queue_length,
                request.eta.min.ToMilliseconds() / 1000,
                request.eta.max.ToMilliseconds() / 1000,
            )
        return "Your request has been queued for secure local processing"
    if state == request_pb2.REQUEST_STATE_RUNNING:
        if kind == notifier_pb2.UPDATE_KIND_CANCEL_REQUESTED:
            return "Cancelling your request…"
        if kind == notifier_pb2.UPDATE_KIND_PROGRESS and fraction > 0:
            return progress_message(fraction)
        if request.route == request_pb2.ROUTE_EXTERNAL:
            return EXTERNAL_PROCESSING
        return LOCAL_PROCESSING
    if state == request_pb2.REQUEST_STATE_COMPLETED:
        took = (request.finished_at.ToMilliseconds() - request.started_at.ToMilliseconds()) / 1000
        return ready_message(max(took, 0.0))
    if state == request_pb2.REQUEST_STATE_CANCELLED:
        return (
            f"Your request was cancelled ({request.error})"
            if request.error
            else "Your request was cancelled"
        )
    if state == request_pb2.REQUEST_STATE_EXPIRED:
        return f"Your request expired: {request.error}"
    if state == request_pb2.REQUEST_STATE_FAILED:
        return f"Your request failed: {request.error}"
    return ""
