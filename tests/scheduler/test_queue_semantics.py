"""Ordering, leases, timeouts and dead letters of the Redis queue (real Redis, real scripts)."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.scheduler.reaper import reap_once
from services.scheduler.store import FinishedWork, NewRequest, QueueStore
from tests.scheduler.factories import new_request
from usher import keys
from usher.ids import new_request_id
from usher.keys import ModelKeys
from usher.queue.fairness import FairQueue
from usher.queue.records import QueueDefaults, to_proto
from usher.v1 import request_pb2

MODEL = "llama3.2"
NORMAL, HIGH, LOW = request_pb2.PRIORITY_NORMAL, request_pb2.PRIORITY_HIGH, request_pb2.PRIORITY_LOW


async def claim_order(store: QueueStore, n: int) -> list[str]:
    order = []
    for _ in range(n):
        lease = await store.claim(MODEL, "test")
        assert lease is not None
        order.append(lease.request.id)
    return order


async def test_a_light_tenant_is_not_stuck_behind_a_flood(store: QueueStore) -> None:
    flood = [new_request(user="heavy", prompt_tokens=500) for _ in range(30)]
    for request in flood:
        await store.submit(request)
    await claim_order(store, 5)  # the fleet is busy with the flood
    light = new_request(user="light", prompt_tokens=500)
    outcome = await store.submit(light)
    assert outcome.position <= 2, outcome
    assert outcome.queue_length == 26


async def test_two_tenants_alternate(store: QueueStore) -> None:
    a = [new_request(user="a") for _ in range(5)]
    b = [new_request(user="b") for _ in range(5)]
    for request in a + b:
        await store.submit(request)
    order = await claim_order(store, 10)
    owners = ["a" if i in {r.id for r in a} else "b" for i in order]
    assert owners == ["a", "b"] * 5


async def test_priority_first_then_aging(redis_client: aioredis.Redis) -> None:
    # lead 1000 virtual tokens per class step; each request costs 100 + 256 expected output.
    store = QueueStore(redis_client, QueueDefaults(priority_lead=1000, max_queue_size=1000))
    low = new_request(user="batch", priority=LOW, prompt_tokens=100)
    await store.submit(low)
    highs = [new_request(user=f"u{i % 3}", priority=HIGH, prompt_tokens=100) for i in range(30)]
    served_before_low = 0
    for high in highs:
        await store.submit(high)
    order = await claim_order(store, 31)
    served_before_low = order.index(low.id)
    assert 0 < served_before_low < 30  # priority first, but it did not wait for all of them
    # The low request's score is 2 * 1000 ahead; 3 flows of 356-token requests reach it after
    # about 2000 / 356 rounds of 3.
    assert served_before_low <= 3 * (2000 // 356 + 2)


async def test_expired_lease_returns_the_request_to_its_place(store: QueueStore) -> None:
    first, second, third = (new_request(user=u) for u in ("a", "b", "c"))
    for request in (first, second, third):
        await store.submit(request)
    lease = await store.claim(MODEL, "doomed-dispatcher", lease_ms=50)
    assert lease is not None and lease.request.id == first.id
    await asyncio.sleep(0.08)
    counts = await store.reap(MODEL)
    assert counts.requeued == 1
    back = await store.get(first.id)
    assert back is not None
    assert (back.state, back.position, back.queue_length, back.attempts) == (
        request_pb2.REQUEST_STATE_QUEUED,
        1,
        3,
        1,
    )
    # The dead dispatcher's lease is fenced: it cannot finish or heartbeat any more.
    assert not await store.finish(lease, FinishedWork(state=request_pb2.REQUEST_STATE_COMPLETED))
    assert await store.heartbeat(lease) == -1
    again = await store.claim(MODEL, "healthy-dispatcher")
    assert again is not None and again.request.id == first.id and again.request.attempts == 2


async def test_heartbeat_keeps_the_lease(store: QueueStore) -> None:
    await store.submit(new_request())
    lease = await store.claim(MODEL, "d", lease_ms=100)
    assert lease is not None
    for _ in range(4):
        await asyncio.sleep(0.05)
        assert await store.heartbeat(lease) == 0  # its lease: 100 ms
        await store.reap(MODEL)
    current = await store.get(lease.request.id)
    assert current is not None and current.state == request_pb2.REQUEST_STATE_RUNNING


async def test_max_attempts_dead_letters(redis_client: aioredis.Redis) -> None:
    store = QueueStore(redis_client, QueueDefaults(max_attempts=2))
    request = new_request()
    await store.submit(request)
    for _ in range(2):
        assert await store.claim(MODEL, "d", lease_ms=10) is not None
        await asyncio.sleep(0.03)
        await store.reap(MODEL)
    failed = await store.get(request.id)
    assert failed is not None and failed.state == request_pb2.REQUEST_STATE_FAILED
    assert "2 attempts" in failed.error
    assert [r.id for r in await store.dead_letters(MODEL, 10)] == [request.id]


async def dead_letter(store: QueueStore, user: str) -> str:
    """A request that failed its every attempt (one), onto the dead-letter list."""
    request = new_request(user=user)
    await store.submit(request)
    assert await store.claim(MODEL, "d", lease_ms=10) is not None
    await asyncio.sleep(0.03)
    assert (await store.reap(MODEL)).dead_lettered == 1
    return request.id


async def test_dead_letters_are_deleted_after_their_retention(
    redis_client: aioredis.Redis,
) -> None:
    """A dead letter keeps its data (no expiry: it waits to be retried) for the retention,
    then the reaper deletes it, its record, owners and events; a younger one stays."""
    store = QueueStore(redis_client, QueueDefaults(max_attempts=1, dead_letter_retention_seconds=1))
    old = await dead_letter(store, "old")
    assert (await store.reap(MODEL)).dead_letters_deleted == 0
    await asyncio.sleep(0.7)
    young = await dead_letter(store, "young")
    deleted = 0
    for _ in range(100):  # until the retention has passed (the reaper reads the clock)
        await asyncio.sleep(0.1)
        deleted += (await reap_once(store))[MODEL].dead_letters_deleted
        if await store.get(old) is None:
            break
    assert deleted == 1
    assert [r.id for r in await store.dead_letters(MODEL, 10)] == [young]
    assert await store.dead_letter_count(MODEL) == 1
    mk = ModelKeys(MODEL)
    assert not await redis_client.exists(
        mk.request(old), mk.request_owners(old), mk.request_events(old)
    )
    assert await redis_client.ttl(mk.request(young)) == -1  # still kept whole, no expiry


async def test_dead_letters_are_kept_until_retried_with_no_retention(
    redis_client: aioredis.Redis,
) -> None:
    store = QueueStore(redis_client, QueueDefaults(max_attempts=1, dead_letter_retention_seconds=0))
    kept = await dead_letter(store, "kept")
    await asyncio.sleep(1.1)
    assert (await store.reap(MODEL)).dead_letters_deleted == 0
    assert [r.id for r in await store.dead_letters(MODEL, 10)] == [kept]


async def test_a_backoff_waits_out_of_line_queued_and_holding_nothing(
    store: QueueStore,
) -> None:
    """A failed attempt requeued with a backoff is QUEUED (with when it retries) but not in
    line: nothing can claim it and it holds no lease; once the backoff passes the reaper
    puts it back in its original place, ahead of later arrivals."""
    first, later = new_request(user="a"), new_request(user="b")
    await store.submit(first)
    lease = await store.claim(MODEL, "d")
    assert lease is not None and lease.request.id == first.id
    await store.submit(later)
    assert await store.requeue(lease, "model server failed", count_attempt=True, backoff_ms=400)

    waiting = await store.get(first.id)
    assert waiting is not None and waiting.state == request_pb2.REQUEST_STATE_QUEUED
    assert waiting.retry_at_ms > 0
    assert to_proto(waiting).HasField("retry_at")
    assert await store.running_count(MODEL) == 0
    assert (await store.reap(MODEL)).back_in_line == 0  # not yet
    other = await store.claim(MODEL, "d")  # only the later one is in line
    assert other is not None and other.request.id == later.id
    assert await store.requeue(other, "no slot", count_attempt=False)

    for _ in range(100):  # until the backoff has passed (the reaper reads the clock)
        await asyncio.sleep(0.05)
        if (await store.reap(MODEL)).back_in_line:
            break
    back = await store.get(first.id)
    assert back is not None and back.retry_at_ms == 0 and not to_proto(back).HasField("retry_at")
    assert await claim_order(store, 2) == [first.id, later.id]  # its own place again


async def test_a_request_in_backoff_can_be_cancelled_drained_or_expire(
    store: QueueStore,
) -> None:
    cancelled, drained, expiring = (new_request(user=u) for u in ("c", "d", "e"))
    for request in (cancelled, drained, expiring):
        await store.submit(request)
        lease = await store.claim(MODEL, "d")
        assert lease is not None
        assert await store.requeue(lease, "failed", count_attempt=True, backoff_ms=60_000)
    assert await store.cancel(MODEL, cancelled.id, "", True, "changed my mind") == "cancelled"
    # Its queue timeout passes while it waits out the backoff: it expires.
    await store.redis.hset(ModelKeys(MODEL).request(expiring.id), "expires_ms", 1)
    await store.redis.zadd(ModelKeys(MODEL).deadlines, {expiring.id: 1})
    assert (await store.reap(MODEL)).expired == 1
    assert [e.request_id for e in await store.drain(MODEL, "maintenance")] == [drained.id]
    states = {r.id: await store.get(r.id) for r in (cancelled, drained, expiring)}
    assert {i: r.state for i, r in states.items() if r is not None} == {
        cancelled.id: request_pb2.REQUEST_STATE_CANCELLED,
        drained.id: request_pb2.REQUEST_STATE_CANCELLED,
        expiring.id: request_pb2.REQUEST_STATE_EXPIRED,
    }
    assert await store.redis.zcard(ModelKeys(MODEL).retrying) == 0


async def test_queue_timeout_expires_or_falls_back(store: QueueStore) -> None:
    plain = new_request(queue_timeout_ms=30)
    with_fallback = new_request(
        user="b", queue_timeout_ms=30, fallback=request_pb2.FALLBACK_POLICY_AFTER_TIMEOUT
    )
    local_only = new_request(
        user="c", queue_timeout_ms=30, fallback=request_pb2.FALLBACK_POLICY_LOCAL_ONLY
    )
    waiting = new_request(user="d")
    for request in (plain, with_fallback, local_only, waiting):
        await store.submit(request)
    await asyncio.sleep(0.06)
    await reap_once(store)
    states = {r.id: (await store.get(r.id)) for r in (plain, with_fallback, local_only, waiting)}
    assert states[plain.id].state == request_pb2.REQUEST_STATE_EXPIRED  # type: ignore[union-attr]
    assert states[plain.id].error == "queue timeout passed"  # type: ignore[union-attr]
    assert states[local_only.id].state == request_pb2.REQUEST_STATE_EXPIRED  # type: ignore[union-attr]
    handed = states[with_fallback.id]
    assert handed is not None and handed.state == request_pb2.REQUEST_STATE_QUEUED
    assert handed.route == request_pb2.ROUTE_EXTERNAL
    assert states[waiting.id].position == 1  # type: ignore[union-attr]
    external = await store.claim(MODEL, "external-dispatcher", external=True)
    assert external is not None and external.request.id == with_fallback.id


async def test_deadline_expires_a_queued_request(store: QueueStore) -> None:
    import time

    request = new_request(deadline_ms=int(time.time() * 1000) + 30)
    await store.submit(request)
    await asyncio.sleep(0.06)
    await store.reap(MODEL)
    gone = await store.get(request.id)
    assert gone is not None and gone.state == request_pb2.REQUEST_STATE_EXPIRED
    assert gone.error == "deadline passed"


async def test_completion_updates_the_averages_used_for_eta(store: QueueStore) -> None:
    for seconds in (10.0, 20.0):
        await store.submit(new_request())
        lease = await store.claim(MODEL, "d")
        assert lease is not None
        await store.finish(
            lease,
            FinishedWork(
                state=request_pb2.REQUEST_STATE_COMPLETED,
                actual_tokens=300,
                service_ms=seconds * 1000,
                tokens_per_second=40,
                output_tokens=200,
            ),
        )
    store._averages.clear()
    averages, _ = await store.model_averages(MODEL)
    assert averages.service_seconds == 15.0  # the first samples are a plain mean
    assert averages.output_tokens == 200
    assert averages.service_variance > 0


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["alice", "bob", "carol"]),
            st.sampled_from([HIGH, NORMAL, LOW]),
            st.integers(min_value=1, max_value=3000),
            st.booleans(),
        ),
        min_size=1,
        max_size=25,
    )
)
async def test_redis_order_matches_the_reference_model(
    redis_client: aioredis.Redis, steps: list[tuple[str, int, int, bool]]
) -> None:
    """The Lua scripts and fairness.FairQueue agree on every dispatch."""
    await redis_client.flushdb()
    store = QueueStore(redis_client, QueueDefaults(max_queue_size=1000, default_output_tokens=0))
    model = FairQueue(lead=store.defaults.priority_lead)
    ids: dict[int, str] = {}
    for tenant, priority, tokens, then_pop in steps:
        request = new_request(user=tenant, priority=priority, prompt_tokens=tokens)
        await store.submit(request)
        item = model.push(f"acme/{tenant}", float(tokens), klass=priority)
        ids[item.seq] = request.id
        if then_pop:
            lease = await store.claim(MODEL, "d")
            assert lease is not None
            assert lease.request.id == ids[model.pop().seq]
    while len(model):
        lease = await store.claim(MODEL, "d")
        assert lease is not None
        assert lease.request.id == ids[model.pop().seq]


async def test_cheap_answers_do_not_let_a_tenants_later_request_jump_its_queue(
    store: QueueStore,
) -> None:
    """complete.lua settles the flow's finish tag down by what the estimate overshot, but
    never below its newest request's start: alice's queued requests keep their order."""
    requests = [new_request(num_predict=400) for _ in range(5)]
    for request in requests:
        await store.submit(request)
    for _ in range(2):  # two run at once and both answer far shorter than estimated
        lease = await store.claim("llama3.2", "d")
        assert lease is not None
        await store.finish(
            lease, FinishedWork(state=request_pb2.REQUEST_STATE_COMPLETED, actual_tokens=10)
        )
    later = new_request(num_predict=400)
    await store.submit(later)
    order = []
    while (next_lease := await store.claim("llama3.2", "d")) is not None:
        order.append(next_lease.request.id)
    assert order == [r.id for r in requests[2:]] + [later.id]


async def test_a_request_is_found_by_its_id_alone_without_an_index_entry(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    """Its id ends with its model's tag: the models with that tag are asked, those a Submit
    named (kept when a model leaves the fleet) and the live ones (a lost write of the
    names made good); a request made before ids carried the tag, by its index entry."""
    first = await store.submit(new_request(model="llama3.2"))
    other = await store.submit(new_request(model="qwen2.5"))
    assert [k async for k in redis_client.scan_iter(match=keys.request_index("*"))] == []
    assert await store.models_of([first.request_id, other.request_id]) == ["llama3.2", "qwen2.5"]
    # The model left the fleet (off the model set): its request is still found.
    await redis_client.srem(keys.MODELS, "llama3.2")
    found = await store.get(first.request_id)
    assert found is not None and found.id == first.request_id
    # A failover lost the names but not the model set: found again once the names are read.
    await redis_client.delete(keys.MODEL_NAMES)
    fresh = QueueStore(redis_client)
    assert await fresh.model_of(other.request_id) == "qwen2.5"
    # A new model's first request, moments after the names were read: read again.
    newest = await store.submit(new_request(model="gemma3"))
    assert await fresh.model_of(newest.request_id) == "gemma3"
    # An id of the old kind (no tag) by its index entry; an unknown id by nothing.
    old = new_request(model="llama3.2")
    old = NewRequest(
        **{**{f: getattr(old, f) for f in old.__dataclass_fields__}, "id": new_request_id()}
    )
    await store.submit(old)
    await redis_client.set(keys.request_index(old.id), "llama3.2")
    assert await fresh.models_of([old.id, new_request_id(model="gone")]) == ["llama3.2", None]
