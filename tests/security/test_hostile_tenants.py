"""What one ordinary (or hostile) caller must not be able to do to the others, each finding
of the security probe as a test on a real Scheduler over a real socket and a real Redis."""

from __future__ import annotations

import asyncio
import base64
import time

import grpc
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2

from services.scheduler.quotas import Quotas
from tests.scheduler.factories import generate_submit
from tests.scheduler.test_api import details
from tests.security.conftest import Scheduler, auth, running_scheduler
from usher import keys
from usher.keys import ModelKeys
from usher.testing.redis_server import ExternalRedis, RedisServer
from usher.v1 import request_pb2, scheduler_pb2

MODEL = "llama3.2"
Server = RedisServer | ExternalRedis


async def refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


async def pause(s: Scheduler) -> None:
    await s.admin.PauseQueue(
        scheduler_pb2.PauseQueueRequest(model=MODEL, paused=True), metadata=auth("root")
    )


async def wait_state(s: Scheduler, request_id: str, state: int, who: str = "root") -> None:
    for _ in range(200):
        got = await s.scheduler.Get(scheduler_pb2.GetRequest(id=request_id), metadata=auth(who))
        if got.request.state == state:
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"{request_id} never reached state {state}")


def with_image(size: int) -> scheduler_pb2.SubmitRequest:
    submit = scheduler_pb2.SubmitRequest(model=MODEL)
    submit.chat.messages.add(role="user", content="what is this?", images=["A" * size])
    return submit


async def test_images_tools_and_labels_count_against_the_size_limit(
    redis_server: Server, redis_client: aioredis.Redis
) -> None:
    async with running_scheduler(redis_server.url, max_prompt_chars=10_000) as s:
        await s.scheduler.Submit(with_image(5_000), metadata=auth("alice"))
        error = await refused(s.scheduler.Submit(with_image(20_000), metadata=auth("alice")))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        (bad,) = details(error)
        assert isinstance(bad, error_details_pb2.BadRequest)
        assert bad.field_violations[0].field == "chat"
        assert "exceed the limit of 10000" in bad.field_violations[0].description

        labelled = generate_submit(prompt="small")
        labelled.labels["note"] = "x" * 5_000
        error = await refused(s.scheduler.Submit(labelled, metadata=auth("alice")))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "labels[note]" in (error.details() or "")

        many = generate_submit(prompt="small")
        for i in range(32):
            many.labels[f"k{i}"] = "v" * 250
        many.generate.system = "s" * 3_000
        error = await refused(s.scheduler.Submit(many, metadata=auth("alice")))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "exceed the limit" in (error.details() or "")


async def test_requests_ended_without_running_keep_no_payload(
    redis_server: Server, redis_client: aioredis.Redis
) -> None:
    async with running_scheduler(redis_server.url) as s:
        await pause(s)
        big = generate_submit(prompt="p" * 200_000)
        cancelled = (await s.scheduler.Submit(big, metadata=auth("alice"))).request.id
        drained = (await s.scheduler.Submit(big, metadata=auth("bob"))).request.id
        short = generate_submit(prompt="q" * 200_000)
        short.queue_timeout.FromMilliseconds(100)
        expired = (await s.scheduler.Submit(short, metadata=auth("alice"))).request.id
        mk = ModelKeys(MODEL)
        assert await redis_client.hexists(mk.request(cancelled), "payload")

        await s.scheduler.Cancel(scheduler_pb2.CancelRequest(id=cancelled), metadata=auth("alice"))
        await wait_state(s, expired, request_pb2.REQUEST_STATE_EXPIRED)
        await s.admin.DrainQueue(
            scheduler_pb2.DrainQueueRequest(model=MODEL), metadata=auth("root")
        )
        for request_id in (cancelled, drained, expired):
            record = mk.request(request_id)
            assert not await redis_client.hget(record, "payload"), request_id  # emptied
            assert await redis_client.hget(record, "state") is not None  # metadata stays
            assert await redis_client.ttl(record) > 0
            assert (await redis_client.memory_usage(record) or 0) < 4_000


async def test_a_tenant_cannot_store_more_than_its_bound(
    redis_server: Server, redis_client: aioredis.Redis
) -> None:
    async with running_scheduler(
        redis_server.url, max_prompt_chars=100_000, tenant_max_stored_bytes=350_000
    ) as s:
        await pause(s)
        ids = []
        for i in range(3):
            sent = await s.scheduler.Submit(
                generate_submit(prompt=f"{i}" * 99_000), metadata=auth("alice")
            )
            ids.append(sent.request.id)
        error = await refused(
            s.scheduler.Submit(generate_submit(prompt="4" * 99_000), metadata=auth("alice"))
        )
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "350000 bytes" in (error.details() or "")
        (retry,) = details(error)
        assert isinstance(retry, error_details_pb2.RetryInfo)
        assert 1_000 <= retry.retry_delay.ToMilliseconds() <= 60_000
        # Others are not affected.
        await s.scheduler.Submit(generate_submit(prompt="b" * 99_000), metadata=auth("bob"))

        # A cancelled request keeps only its metadata: the room comes back.
        await s.scheduler.Cancel(scheduler_pb2.CancelRequest(id=ids[0]), metadata=auth("alice"))
        await s.scheduler.Submit(generate_submit(prompt="5" * 99_000), metadata=auth("alice"))
        await s.admin.DrainQueue(
            scheduler_pb2.DrainQueueRequest(model=MODEL), metadata=auth("root")
        )
        quotas = Quotas(redis_client)
        # Four requests end with their metadata and event streams only (no prompts).
        assert await quotas.stored_bytes(keys.tenant_id("acme", "alice")) < 4 * 10_000


async def test_redis_out_of_memory_is_resource_exhausted_without_redis_text(
    redis_server: Server, redis_client: aioredis.Redis
) -> None:
    async with running_scheduler(redis_server.url) as s:
        await s.scheduler.Submit(generate_submit(prompt="warm"), metadata=auth("alice"))
        policy = str((await redis_client.config_get("maxmemory-policy"))["maxmemory-policy"])
        used = int((await redis_client.info("memory"))["used_memory"])
        await redis_client.config_set("maxmemory-policy", "noeviction")
        await redis_client.config_set("maxmemory", max(1, used // 2))
        try:
            error = await refused(
                s.scheduler.Submit(generate_submit(prompt="x" * 10_000), metadata=auth("alice"))
            )
        finally:
            await redis_client.config_set("maxmemory", 0)
            await redis_client.config_set("maxmemory-policy", policy)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        text = (error.details() or "").lower()
        assert "out of memory" in text
        for internal in ("oom", "maxmemory", "script", "evalsha", "usher:"):
            assert internal not in text
        assert any(isinstance(d, error_details_pb2.RetryInfo) for d in details(error))


async def test_other_redis_errors_are_unavailable_without_redis_text(
    redis_server: Server, redis_client: aioredis.Redis
) -> None:
    async with running_scheduler(redis_server.url) as s:
        # A key of the wrong type stands for any command Redis refuses.
        await redis_client.set(keys.MODELS, "not a set")
        error = await refused(
            s.scheduler.Submit(generate_submit(prompt="x"), metadata=auth("alice"))
        )
        await redis_client.delete(keys.MODELS)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        text = (error.details() or "").lower()
        for internal in ("wrongtype", "operation against a key", "usher:"):
            assert internal not in text


async def test_refused_admin_calls_cannot_push_admin_events_out(
    redis_server: Server, redis_client: aioredis.Redis
) -> None:
    async with running_scheduler(redis_server.url) as s:
        await pause(s)
        pause_call = scheduler_pb2.PauseQueueRequest(model=MODEL, paused=True)
        for i in range(300):
            metadata = () if i % 3 == 0 else auth("nobody") if i % 3 == 1 else auth("bob")
            with pytest.raises(grpc.aio.AioRpcError):
                await s.admin.PauseQueue(pause_call, metadata=metadata)
        events = (
            await s.admin.ListAuditEvents(
                scheduler_pb2.ListAuditEventsRequest(), metadata=auth("root")
            )
        ).events
        await s.app.audit.flush(force=True)
        # Only the real admin's calls (pause, list) are admin events; refusals are a summary.
        assert await redis_client.xlen(keys.AUDIT) == 2
        assert await redis_client.xlen(keys.AUDIT_ACTIVITY) <= 2
        (summary,) = [e for e in events if e.action == "admin.refused"]
        assert summary.detail.startswith("300 refused admin calls")
        assert ("ops/root", "admin.pause_queue", "ok") in [
            (e.actor, e.action, e.outcome) for e in events
        ]


async def test_concurrency_slots_come_back_when_requests_expire_or_are_drained(
    redis_server: Server, redis_client: aioredis.Redis
) -> None:
    async with running_scheduler(redis_server.url) as s:
        await s.admin.SetTenantLimits(
            scheduler_pb2.SetTenantLimitsRequest(
                tenant=request_pb2.Tenant(organization="acme", user="alice"),
                limits=scheduler_pb2.TenantLimits(max_concurrent=1),
            ),
            metadata=auth("root"),
        )
        await pause(s)
        short = generate_submit(prompt="expires")
        short.queue_timeout.FromMilliseconds(100)
        first = await s.scheduler.Submit(short, metadata=auth("alice"))
        error = await refused(s.scheduler.Submit(generate_submit(), metadata=auth("alice")))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        await wait_state(s, first.request.id, request_pb2.REQUEST_STATE_EXPIRED)
        await asyncio.sleep(0.1)  # the reaper settles the slot right after the script
        await s.scheduler.Submit(generate_submit(prompt="second"), metadata=auth("alice"))
        await s.admin.DrainQueue(
            scheduler_pb2.DrainQueueRequest(model=MODEL), metadata=auth("root")
        )
        await s.scheduler.Submit(generate_submit(prompt="third"), metadata=auth("alice"))


async def test_tenants_whose_names_join_alike_stay_apart(
    redis_server: Server, redis_client: aioredis.Redis
) -> None:
    async with running_scheduler(redis_server.url) as s:
        await pause(s)
        # org "a/b" + user "c" and org "a" + user "b/c" both read "a/b/c" when joined.
        keyed = generate_submit(prompt="mine")
        keyed.idempotency_key = "k"
        first = await s.scheduler.Submit(keyed, metadata=auth("ab-c"))
        other = await s.scheduler.Submit(keyed, metadata=auth("a-bc"))
        assert not other.replayed and other.request.id != first.request.id
        error = await refused(
            s.scheduler.Get(scheduler_pb2.GetRequest(id=first.request.id), metadata=auth("a-bc"))
        )
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        listed = await s.scheduler.List(scheduler_pb2.ListRequest(), metadata=auth("a-bc"))
        assert [r.id for r in listed.requests] == [other.request.id]

        # user "alice:zz" + key "k1" must not replay alice's key "zz:k1".
        alices = generate_submit(prompt="alice's secret")
        alices.idempotency_key = "zz:k1"
        original = await s.scheduler.Submit(alices, metadata=auth("alice"))
        probe = generate_submit(prompt="anything")
        probe.idempotency_key = "k1"
        answer = await s.scheduler.Submit(probe, metadata=auth("mallory"))
        assert not answer.replayed and answer.request.id != original.request.id
        again = await s.scheduler.Submit(alices, metadata=auth("alice"))
        assert again.replayed and again.request.id == original.request.id


async def test_dedup_joins_only_requests_served_alike_and_a_detach_is_audited(
    redis_server: Server, redis_client: aioredis.Redis
) -> None:
    async with running_scheduler(redis_server.url) as s:
        await pause(s)

        def greedy(**fields: object) -> scheduler_pb2.SubmitRequest:
            request = generate_submit(prompt="same words", temperature=0)
            for name, value in fields.items():
                setattr(request, name, value)
            return request

        base = await s.scheduler.Submit(
            greedy(fallback_policy=request_pb2.FALLBACK_POLICY_AFTER_TIMEOUT),
            metadata=auth("alice"),
        )
        local = await s.scheduler.Submit(
            greedy(fallback_policy=request_pb2.FALLBACK_POLICY_LOCAL_ONLY), metadata=auth("bob")
        )
        urgent = await s.scheduler.Submit(
            greedy(
                fallback_policy=request_pb2.FALLBACK_POLICY_AFTER_TIMEOUT,
                priority=request_pb2.PRIORITY_CRITICAL,
            ),
            metadata=auth("bob"),
        )
        hurried = greedy(fallback_policy=request_pb2.FALLBACK_POLICY_AFTER_TIMEOUT)
        hurried.deadline.FromSeconds(int(time.time()) + 3600)
        late = await s.scheduler.Submit(hurried, metadata=auth("bob"))
        assert not (local.deduplicated or urgent.deduplicated or late.deduplicated)
        assert len({base.request.id, local.request.id, urgent.request.id, late.request.id}) == 4
        alike = await s.scheduler.Submit(
            greedy(fallback_policy=request_pb2.FALLBACK_POLICY_AFTER_TIMEOUT),
            metadata=auth("bob"),
        )
        assert alike.deduplicated and alike.request.id == base.request.id

        await s.scheduler.Cancel(
            scheduler_pb2.CancelRequest(id=base.request.id), metadata=auth("bob")
        )
        events = (
            await s.admin.ListAuditEvents(
                scheduler_pb2.ListAuditEventsRequest(), metadata=auth("root")
            )
        ).events
        assert ("acme/bob", "cancel", base.request.id, "detached") in [
            (e.actor, e.action, e.target, e.outcome) for e in events
        ]


async def test_names_keys_and_tokens_are_matched_whole(
    redis_server: Server, redis_client: aioredis.Redis
) -> None:
    async with running_scheduler(redis_server.url) as s:
        for field, value in (("model", "qwen2.5:0.5b\n"), ("idempotency_key", "abc\n")):
            request = generate_submit(model="qwen2.5:0.5b")
            setattr(request, field, value)
            error = await refused(s.scheduler.Submit(request, metadata=auth("alice")))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in (error.details() or "")
        error = await refused(
            s.admin.PauseQueue(
                scheduler_pb2.PauseQueueRequest(model=f"{MODEL}\n"), metadata=auth("root")
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        for token in (
            base64.urlsafe_b64encode(b"99999999999999999999").decode(),
            base64.urlsafe_b64encode(b"-5").decode(),
            "A" * 10_000,
            "!!",
        ):
            error = await refused(
                s.scheduler.List(
                    scheduler_pb2.ListRequest(page_token=token), metadata=auth("alice")
                )
            )
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, token
            assert "page_token" in (error.details() or "")
