"""What people waiting over HTTP are shown (pure): Notifier updates and badges → JSON,
Server-Sent Events framing, the keepalive comment of a queued OpenAI stream, and when to
offer the external provider with the product's prompts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services.gateway.openai_shapes import openai_usage
from services.gateway.responses import dumps
from usher import messages
from usher.v1 import notifier_pb2, pool_pb2, request_pb2

__all__ = [
    "NO_FLEET",
    "Fleet",
    "badges_json",
    "fallback_prompt",
    "fleet_of",
    "is_terminal",
    "request_json",
    "sse_comment",
    "sse_event",
    "switch_offered",
    "update_json",
]

R = request_pb2
K = notifier_pb2
_STATES = {
    R.REQUEST_STATE_QUEUED: "queued",
    R.REQUEST_STATE_RUNNING: "running",
    R.REQUEST_STATE_COMPLETED: "completed",
    R.REQUEST_STATE_FAILED: "failed",
    R.REQUEST_STATE_CANCELLED: "cancelled",
    R.REQUEST_STATE_EXPIRED: "expired",
}
_LEVELS = {
    K.QUEUE_LEVEL_AVAILABLE: "available",
    K.QUEUE_LEVEL_SHORT: "short",
    K.QUEUE_LEVEL_MEDIUM: "medium",
    K.QUEUE_LEVEL_LONG: "long",
}


_TERMINAL = frozenset(
    {K.UPDATE_KIND_COMPLETED, K.UPDATE_KIND_FAILED, K.UPDATE_KIND_CANCELLED, K.UPDATE_KIND_EXPIRED}
)


@dataclass(frozen=True, slots=True)
class Fleet:
    """What the offers depend on: is there an external provider, which models a healthy
    local instance serves."""

    external: bool = False
    local_models: frozenset[str] = frozenset()


NO_FLEET = Fleet()


def fleet_of(instances: Sequence[pool_pb2.InstanceStatus]) -> Fleet:
    healthy = [i for i in instances if i.health == pool_pb2.INSTANCE_HEALTH_HEALTHY]
    return Fleet(
        external=any(i.config.external for i in healthy),
        local_models=frozenset(
            m for i in healthy if not i.config.external for m in i.available_models
        ),
    )


def is_terminal(kind: int) -> bool:
    """The request's last update: nothing follows it."""
    return kind in _TERMINAL


def sse_event(data: Mapping[str, Any], event_id: str = "", event: str = "") -> bytes:
    """One Server-Sent Event; ``id`` only when the update has a resume token."""
    head = f"id: {event_id}\n" if event_id else ""
    if event:
        head += f"event: {event}\n"
    return f"{head}data: {dumps(data)}\n\n".encode()


def sse_comment(text: str) -> bytes:
    """A comment line: clients ignore it, proxies see traffic."""
    return f": {text.replace(chr(10), ' ')}\n\n".encode()


def _seconds(duration: Any) -> float:
    return round(float(duration.ToMilliseconds()) / 1000, 3)


def switch_offered(request: request_pb2.LlmRequest, fleet: Fleet) -> bool:
    """The user may still move this request to the external provider."""
    return messages.switch_offered(request, fleet.external)


def fallback_prompt(request: request_pb2.LlmRequest, fleet: Fleet, now: float) -> str:
    """The product's prompt for this moment, or "": a wait past half of what the queue
    allows, a long queue, or the notice that no local instance can serve it and it goes to
    the external provider (not said when the user chose to switch)."""
    if request.route == R.ROUTE_EXTERNAL and request.state == R.REQUEST_STATE_QUEUED:
        return messages.UNAVAILABLE_NOTICE if request.model not in fleet.local_models else ""
    return messages.fallback_prompt(request, fleet.external, now)


def request_json(
    request: request_pb2.LlmRequest, *, fleet: Fleet = NO_FLEET, now: float = 0.0
) -> dict[str, Any]:
    """A request's status as the browser sees it (never its prompt or owner)."""
    body: dict[str, Any] = {
        "id": request.id,
        "model": request.model,
        "state": _STATES.get(request.state, "unknown"),
        "route": "external" if request.route == R.ROUTE_EXTERNAL else "local",
        "switch_offered": switch_offered(request, fleet),
        "prompt": fallback_prompt(request, fleet, now) if now else "",
    }
    if request.state == R.REQUEST_STATE_QUEUED and request.position.position:
        body["position"] = request.position.position
        body["queue_length"] = request.position.queue_length
    if request.state == R.REQUEST_STATE_QUEUED and request.HasField("retry_at"):
        # Waiting out a failed attempt's backoff, out of line until then (epoch seconds).
        body["retry_at"] = request.retry_at.ToMilliseconds() / 1000
    if request.HasField("eta") and request.state in (
        R.REQUEST_STATE_QUEUED,
        R.REQUEST_STATE_RUNNING,
    ):
        body["eta"] = {
            "min_seconds": _seconds(request.eta.min),
            "max_seconds": _seconds(request.eta.max),
        }
    if request.error:
        body["error"] = request.error
    if request.state == R.REQUEST_STATE_COMPLETED:
        body["result"] = {
            "text": request.result.text,
            "done_reason": request.result.done_reason,
            "served_by_model": request.result.served_by_model or request.model,
            "usage": openai_usage(request),
            "queue_wait_seconds": _seconds(request.usage.queue_wait),
            "processing_seconds": _seconds(request.usage.processing),
        }
    return body


def update_json(update: notifier_pb2.WatchResponse, *, fleet: Fleet, now: float) -> dict[str, Any]:
    """One Notifier update: kind, message, progress, new text and the request's status."""
    kind = K.UpdateKind.Name(update.kind).removeprefix("UPDATE_KIND_").lower()
    body = request_json(update.request, fleet=fleet, now=now)
    body.update(
        kind=kind,
        message=update.message,
        text=update.text_delta,
        completion_tokens=update.completion_tokens,
        progress=round(update.progress, 4),
    )
    if update.event_id:
        body["event_id"] = update.event_id
    if update.HasField("at"):
        body["at"] = update.at.ToMilliseconds() / 1000  # when the Notifier sent it
    return body


def badges_json(response: notifier_pb2.WatchQueuesResponse) -> dict[str, Any]:
    return {
        "badges": [
            {
                "model": b.model,
                "level": _LEVELS.get(b.level, "unknown"),
                "label": b.label,
                "queued": b.queued,
                "running": b.running,
                "capacity": b.capacity,
                "external_running": b.external_running,
                "wait": {"min_seconds": _seconds(b.wait.min), "max_seconds": _seconds(b.wait.max)},
                "suggested_model": b.suggested_model,
                "suggestion": b.suggestion,
                "queue_full": b.queue_full,
            }
            for b in response.badges
        ],
        "at": response.at.ToMilliseconds() / 1000 if response.HasField("at") else 0,
    }
