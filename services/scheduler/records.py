"""Stored requests as the API shows them (LlmRequest), with position and ETA filled in."""

from __future__ import annotations

import time

from google.protobuf import timestamp_pb2

from services.scheduler import fairness
from services.scheduler.eta import Estimate, ModelAverages, queued_eta
from services.scheduler.store import QUEUED, RUNNING, StoredRequest
from usher.structs import duration_from_seconds
from usher.v1 import request_pb2

__all__ = ["eta_for", "to_proto"]


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
