"""The request headers that steer a model request through the queue (pure):
``X-Usher-Priority``, ``X-Usher-Fallback``, ``X-Usher-Queue-Timeout``, ``X-Usher-Deadline``
(seconds), ``Idempotency-Key`` and ``traceparent`` → the Submit's fields. Both APIs and
``POST /queue/requests`` take them alike; a bad value is a 400 naming the header.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from services.gateway.errors import bad_request
from usher.v1 import request_pb2, scheduler_pb2

__all__ = ["RequestControls", "apply_controls", "parse_controls"]

_PRIORITIES: Mapping[str, request_pb2.Priority.ValueType] = {
    "critical": request_pb2.PRIORITY_CRITICAL,
    "high": request_pb2.PRIORITY_HIGH,
    "normal": request_pb2.PRIORITY_NORMAL,
    "low": request_pb2.PRIORITY_LOW,
    "batch": request_pb2.PRIORITY_BATCH,
}
_FALLBACKS: Mapping[str, request_pb2.FallbackPolicy.ValueType] = {
    "none": request_pb2.FALLBACK_POLICY_NONE,
    "after_timeout": request_pb2.FALLBACK_POLICY_AFTER_TIMEOUT,
    "local_only": request_pb2.FALLBACK_POLICY_LOCAL_ONLY,
}
_MAX_QUEUE_TIMEOUT_SECONDS = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class RequestControls:
    """What the ``X-Usher-*`` (and a few standard) headers ask for."""

    priority: request_pb2.Priority.ValueType = request_pb2.PRIORITY_UNSPECIFIED
    fallback: request_pb2.FallbackPolicy.ValueType = request_pb2.FALLBACK_POLICY_UNSPECIFIED
    queue_timeout_seconds: float | None = None
    deadline_seconds: float | None = None
    idempotency_key: str = ""
    traceparent: str = ""


def _seconds_header(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise bad_request(name, f"{raw[:40]!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise bad_request(name, "must be a positive number of seconds")
    if value > _MAX_QUEUE_TIMEOUT_SECONDS:
        raise bad_request(name, "must be at most 86400 seconds")
    return value


def parse_controls(headers: Mapping[str, str]) -> RequestControls:
    """``X-Usher-Priority``, ``X-Usher-Fallback``, ``X-Usher-Queue-Timeout``,
    ``X-Usher-Deadline`` (seconds), ``Idempotency-Key``, ``traceparent``.

    ``headers`` must look names up case-insensitively (aiohttp's and httpx's do).
    """
    priority = request_pb2.PRIORITY_UNSPECIFIED
    raw = headers.get("X-Usher-Priority", "").strip().lower()
    if raw:
        if raw not in _PRIORITIES:
            raise bad_request("X-Usher-Priority", f"must be one of {', '.join(_PRIORITIES)}")
        priority = _PRIORITIES[raw]
    fallback = request_pb2.FALLBACK_POLICY_UNSPECIFIED
    raw = headers.get("X-Usher-Fallback", "").strip().lower().replace("-", "_")
    if raw:
        if raw not in _FALLBACKS:
            raise bad_request("X-Usher-Fallback", f"must be one of {', '.join(_FALLBACKS)}")
        fallback = _FALLBACKS[raw]
    timeout = headers.get("X-Usher-Queue-Timeout", "").strip()
    deadline = headers.get("X-Usher-Deadline", "").strip()
    key = headers.get("Idempotency-Key", "").strip()
    if key and not re.fullmatch(r"[\x21-\x7e]{1,128}", key):
        raise bad_request("Idempotency-Key", "must be 1-128 printable ASCII characters")
    return RequestControls(
        priority=priority,
        fallback=fallback,
        queue_timeout_seconds=_seconds_header("X-Usher-Queue-Timeout", timeout)
        if timeout
        else None,
        deadline_seconds=_seconds_header("X-Usher-Deadline", deadline) if deadline else None,
        idempotency_key=key,
        traceparent=headers.get("traceparent", "").strip()[:128],
    )


def apply_controls(
    submit: scheduler_pb2.SubmitRequest, controls: RequestControls, now: float
) -> None:
    """Copy the header controls onto a Submit (``now`` in seconds since the epoch)."""
    submit.priority = controls.priority
    submit.fallback_policy = controls.fallback
    if controls.queue_timeout_seconds is not None:
        submit.queue_timeout.FromMilliseconds(round(controls.queue_timeout_seconds * 1000))
    if controls.deadline_seconds is not None:
        submit.deadline.FromMilliseconds(round((now + controls.deadline_seconds) * 1000))
    if controls.idempotency_key:
        submit.idempotency_key = controls.idempotency_key
    if controls.traceparent:
        submit.traceparent = controls.traceparent
