"""Operator controls and tenant quotas on a real Scheduler: rate limits, concurrency, priority
caps, pause/resume, emergency drain, dead-letter retry, and the audit trail of it all."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2

from services.scheduler.quotas import Quotas
from tests.scheduler.conftest import SchedulerClient
from tests.scheduler.factories import generate_submit
from tests.scheduler.test_api import details, submit
from usher import keys
from usher.ids import new_request_id
from usher.keys import ModelKeys
from usher.v1 import request_pb2, scheduler_pb2

A = SchedulerClient.auth
MODEL = "llama3.2"


async def set_limits(client: SchedulerClient, user: str = "alice", **limits: int) -> None:
    await client.admin.SetTenantLimits(
        scheduler_pb2.SetTenantLimitsRequest(
            tenant=request_pb2.Tenant(organization="acme", user=user),
            limits=scheduler_pb2.TenantLimits(**limits),  # type: ignore[arg-type]
        ),
        metadata=A("root"),
    )


async def test_requests_per_minute_is_enforced_with_retry_info(scheduler: SchedulerClient) -> None:
    await set_limits(scheduler, requests_per_minute=3)
    for i in range(3):
        await submit(scheduler, request=generate_submit(prompt=f"r{i}"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await submit(scheduler, request=generate_submit(prompt="one too many"))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "3 requests per minute" in (info.value.details() or "")
    (retry,) = details(info.value)
    assert isinstance(retry, error_details_pb2.RetryInfo)
    assert 1_000 <= retry.retry_delay.ToMilliseconds() <= 20_000  # one request refills in 20 s
    # Other tenants are not affected.
    await submit(scheduler, "bob", request=generate_submit(prompt="bob is fine"))


async def test_a_refused_submit_leaves_nothing_queued_or_listed(
    scheduler: SchedulerClient, redis_client: aioredis.Redis
) -> None:
    """The admission rides the enqueue's round trip (a Redis that is not a Cluster): a
    refusal queues nothing, lists nothing, indexes nothing and leaves no marker behind."""
    await set_limits(scheduler, requests_per_minute=1)
    kept = await submit(scheduler, request=generate_submit(prompt="the one allowed"))
    for attempt in range(3):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await submit(scheduler, request=generate_submit(prompt=f"refused {attempt}"))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    listing = await redis_client.zrange(keys.tenant_requests("acme/alice"), 0, -1)
    assert listing == [kept.request.id.encode()]
    assert [k async for k in redis_client.scan_iter(match=f"{keys.PREFIX}:*refused:*")] == []
    # Found by its id alone (its model's tag): no index entry is written.
    assert [k async for k in redis_client.scan_iter(match=keys.request_index("*"))] == []
    mk = ModelKeys(kept.request.model)
    assert await redis_client.zcard(mk.queue) + await redis_client.zcard(mk.leases) == 1


async def test_a_refusal_left_by_an_earlier_attempt_queues_nothing_and_keeps_no_charge(
    scheduler: SchedulerClient, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A marker an earlier attempt of the same Submit left (its pipeline sent again) makes
    the enqueue queue nothing although this admission admitted: the caller is told to retry
    (UNAVAILABLE) and the charge is given back."""
    request_id = new_request_id()
    monkeypatch.setattr("services.scheduler.service.new_request_id", lambda **_: request_id)
    model = (await submit(scheduler, "bob")).request.model  # the model's served name
    await redis_client.set(ModelKeys(model).admission_refused(request_id), "requests_per_minute")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await submit(scheduler)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await redis_client.zcard(keys.tenant_requests("acme/alice")) == 0
    assert await redis_client.exists(keys.request_index(request_id)) == 0
    assert await Quotas(redis_client).stored_bytes("acme/alice") == 0


async def test_tokens_per_minute_and_concurrency(scheduler: SchedulerClient) -> None:
    await set_limits(scheduler, max_concurrent=2)
    first = await submit(scheduler, request=generate_submit(prompt="1"))
    await submit(scheduler, request=generate_submit(prompt="2"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await submit(scheduler, request=generate_submit(prompt="3"))
    assert "2 requests at once" in (info.value.details() or "")
    await scheduler.scheduler.Cancel(
        scheduler_pb2.CancelRequest(id=first.request.id), metadata=A("alice")
    )
    await submit(scheduler, request=generate_submit(prompt="3"))  # a slot of the quota came back
    await set_limits(scheduler, "bob", tokens_per_minute=300)
    # Each costs its prompt plus about 256 expected output tokens: one fits in 300.
    await submit(scheduler, "bob", request=generate_submit(prompt="tokens 1"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await submit(scheduler, "bob", request=generate_submit(prompt="tokens 2"))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "300 tokens per minute" in (refused.value.details() or "")


async def test_priority_cap_lowers_requests(scheduler: SchedulerClient) -> None:
    await set_limits(scheduler, priority_cap=request_pb2.PRIORITY_NORMAL)
    reply = await submit(
        scheduler, request=generate_submit(), priority=request_pb2.PRIORITY_CRITICAL
    )
    assert reply.request.priority == request_pb2.PRIORITY_NORMAL


async def test_pause_stops_dispatch_and_resume_restarts_it(scheduler: SchedulerClient) -> None:
    await submit(scheduler)
    paused = await scheduler.admin.PauseQueue(
        scheduler_pb2.PauseQueueRequest(model=MODEL, paused=True), metadata=A("root")
    )
    assert paused.config.paused
    assert await scheduler.app.store.claim(MODEL, "d") is None
    await submit(scheduler, request=generate_submit(prompt="still accepted"))
    await scheduler.admin.PauseQueue(
        scheduler_pb2.PauseQueueRequest(model=MODEL, paused=False), metadata=A("root")
    )
    assert await scheduler.app.store.claim(MODEL, "d") is not None


async def test_emergency_drain_ends_every_queued_request_with_a_reason(
    scheduler: SchedulerClient,
) -> None:
    ids = [
        (await submit(scheduler, request=generate_submit(prompt=f"d{i}"))).request.id
        for i in range(5)
    ]
    drained = await scheduler.admin.DrainQueue(
        scheduler_pb2.DrainQueueRequest(model=MODEL, reason="GPU maintenance"), metadata=A("root")
    )
    assert drained.drained == 5
    for request_id in ids:
        got = await scheduler.scheduler.Get(
            scheduler_pb2.GetRequest(id=request_id), metadata=A("alice")
        )
        assert got.request.state == request_pb2.REQUEST_STATE_CANCELLED
        assert got.request.error == "emergency drain: GPU maintenance"


async def test_dead_letters_can_be_retried(scheduler: SchedulerClient) -> None:
    await scheduler.admin.UpdateQueueConfig(
        scheduler_pb2.UpdateQueueConfigRequest(model=MODEL, max_attempts=1), metadata=A("root")
    )
    sent = await submit(scheduler)
    assert await scheduler.app.store.claim(MODEL, "doomed", lease_ms=10) is not None
    await asyncio.sleep(0.2)  # the reaper (every 50 ms here) dead-letters it
    dead = await scheduler.admin.ListDeadLetters(
        scheduler_pb2.ListDeadLettersRequest(model=MODEL), metadata=A("root")
    )
    assert [r.id for r in dead.requests] == [sent.request.id]
    retried = await scheduler.admin.RetryDeadLetter(
        scheduler_pb2.RetryDeadLetterRequest(id=sent.request.id), metadata=A("root")
    )
    assert retried.request.state == request_pb2.REQUEST_STATE_QUEUED
    assert retried.request.position.position == 1
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await scheduler.admin.RetryDeadLetter(
            scheduler_pb2.RetryDeadLetterRequest(id=sent.request.id), metadata=A("root")
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_models_lease_duration_is_its_claims_lease(scheduler: SchedulerClient) -> None:
    config = scheduler_pb2.UpdateQueueConfigRequest(model=MODEL)
    config.lease_duration.FromSeconds(2)
    updated = await scheduler.admin.UpdateQueueConfig(config, metadata=A("root"))
    assert updated.config.lease_duration.ToMilliseconds() == 2000
    await submit(scheduler)
    lease = await scheduler.app.store.claim(MODEL, "d")
    assert lease is not None and lease.lease_ms == 2000


async def test_the_audit_log_records_who_did_what(scheduler: SchedulerClient) -> None:
    sent = await submit(scheduler)
    await scheduler.scheduler.Cancel(
        scheduler_pb2.CancelRequest(id=sent.request.id), metadata=A("alice")
    )
    await scheduler.admin.PauseQueue(
        scheduler_pb2.PauseQueueRequest(model=MODEL, paused=True), metadata=A("root")
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await scheduler.admin.DrainQueue(
            scheduler_pb2.DrainQueueRequest(model=MODEL), metadata=A("bob")
        )
    events = (
        await scheduler.admin.ListAuditEvents(
            scheduler_pb2.ListAuditEventsRequest(), metadata=A("root")
        )
    ).events
    seen = [(e.actor, e.action, e.target, e.outcome) for e in events]
    # A refused admin call is counted into a summary, never an entry of its own.
    (refused,) = [e for e in events if e.action == "admin.refused"]
    assert "acme/bob admin.drain_queue permission_denied x1" in refused.detail
    assert ("ops/root", "admin.pause_queue", MODEL, "ok") in seen
    assert ("acme/alice", "cancel", sent.request.id, "cancelled") in seen
    assert ("acme/alice", "submit", sent.request.id, "ok") in seen
    assert all(e.at.ToMilliseconds() > 0 for e in events)
