"""Slot leases on a real Redis: limits hold across replicas, dead holders' slots come back."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from services.pool.slots import SlotStore, SlotUsage
from usher.connections import connect_redis
from usher.testing.redis_server import ExternalRedis, RedisServer


async def test_limits_hold_with_two_replicas_racing(
    redis_server: RedisServer | ExternalRedis, redis_client: aioredis.Redis
) -> None:
    replicas = [SlotStore(connect_redis(redis_server.url)) for _ in range(2)]
    held: list[int] = []
    peak = 0

    async def churn(store: SlotStore) -> None:
        nonlocal peak
        for _ in range(60):
            grant = await store.try_reserve("gpu-1", "llama3.2", 3, 5, "d", 1)
            if grant is None:
                await asyncio.sleep(0)
                continue
            held.append(1)
            peak = max(peak, len(held))
            await asyncio.sleep(0.001)
            held.pop()
            assert await store.release(grant)

    await asyncio.gather(*(churn(s) for s in replicas for _ in range(4)))
    assert 1 <= peak <= 3
    usage = await replicas[0].usage(["gpu-1"], "llama3.2")
    assert usage["gpu-1"].model_active == 0
    for store in replicas:
        await store.redis.aclose()


async def test_instance_limit_spans_models(redis_client: aioredis.Redis) -> None:
    store = SlotStore(redis_client)
    assert await store.try_reserve("gpu-1", "a", 2, 3, "d", 1)
    assert await store.try_reserve("gpu-1", "a", 2, 3, "d", 1)
    assert await store.try_reserve("gpu-1", "a", 2, 3, "d", 1) is None  # per model
    assert await store.try_reserve("gpu-1", "b", 2, 3, "d", 1)
    assert await store.try_reserve("gpu-1", "b", 2, 3, "d", 1) is None  # per instance
    usage = await store.usage(["gpu-1"], "a")
    assert (usage["gpu-1"].model_active, usage["gpu-1"].total_active) == (2, 3)


async def test_a_dead_holders_slot_expires_and_renewal_keeps_it(
    redis_client: aioredis.Redis,
) -> None:
    # Renewed every tenth of the lease: a loaded machine's stalls (tens of ms) don't let
    # it lapse between renewals.
    store = SlotStore(redis_client, lease_ms=300)
    kept = await store.try_reserve("gpu-1", "a", 1, 0, "alive", 1)
    assert kept is not None
    assert (await store.lookup(kept.id)) == kept
    for _ in range(3):
        await asyncio.sleep(0.03)
        assert await store.renew(kept)
    assert await store.try_reserve("gpu-1", "a", 1, 0, "other", 1) is None
    await asyncio.sleep(0.4)  # the holder stops renewing: it died
    taken = await store.try_reserve("gpu-1", "a", 1, 0, "other", 1)
    assert taken is not None
    assert not await store.renew(kept)
    assert await store.lookup(kept.id) is None


async def test_any_replica_finds_a_slot_from_its_id(
    redis_server: RedisServer | ExternalRedis, redis_client: aioredis.Redis
) -> None:
    granting, other = SlotStore(redis_client), SlotStore(connect_redis(redis_server.url))
    grant = await granting.try_reserve("gpu/1", "hf.co/org/model:Q4", 2, 0, "host:42", 2)
    assert grant is not None
    assert await other.lookup(grant.id) == grant  # no record of it in Redis: the id says it
    assert await other.release(grant)
    assert await granting.lookup(grant.id) is None
    # A slot of an older form (granted before an upgrade) is gone: reserve again.
    assert await other.lookup("gpu/1/0123456789abcdef") is None
    with pytest.raises(ValueError):
        await other.lookup("not-a-slot")
    await other.redis.aclose()


async def test_routing_counts_follow_this_replicas_grants_and_releases(
    redis_client: aioredis.Redis,
) -> None:
    store = SlotStore(redis_client)
    assert (await store.recent_usage(["gpu-1"], "a"))["gpu-1"] == SlotUsage(0, 0)
    grants = [await store.try_reserve("gpu-1", "a", 3, 5, "d", 1) for _ in range(2)]
    assert (await store.recent_usage(["gpu-1"], "a"))["gpu-1"] == SlotUsage(2, 2)
    assert grants[0] is not None and await store.release(grants[0])
    assert (await store.recent_usage(["gpu-1"], "a"))["gpu-1"] == SlotUsage(1, 1)
    # Another replica's grant is seen once the counts are read again.
    assert await SlotStore(redis_client).try_reserve("gpu-1", "a", 3, 5, "d", 1)
    assert (await store.recent_usage(["gpu-1"], "a"))["gpu-1"] == SlotUsage(1, 1)
    assert (await store.recent_usage(["gpu-1"], "a", max_age=0))["gpu-1"] == SlotUsage(2, 2)


async def test_concurrent_calls_share_pipelines_and_keep_the_limits(
    redis_client: aioredis.Redis,
) -> None:
    store = SlotStore(redis_client)
    grants = await asyncio.gather(
        *(store.try_reserve("gpu-1", "a", 3, 0, "d", 1) for _ in range(10))
    )
    held = [g for g in grants if g is not None]
    assert len(held) == 3
    assert all(await asyncio.gather(*(store.release(g) for g in held)))
    assert not await store.release(held[0])  # already gone
    assert (await store.usage(["gpu-1"], "a"))["gpu-1"] == SlotUsage(0, 0)


async def test_held_slots_are_renewed_by_one_loop_until_released(
    redis_client: aioredis.Redis,
) -> None:
    # A lease long enough that a loaded machine's scheduling stalls (tens of ms) don't
    # outlast the two thirds of it left when a renewal is due.
    store = SlotStore(redis_client, lease_ms=300)
    stop = asyncio.Event()
    renewing = asyncio.create_task(store.keep_held(stop))
    grant = await store.try_reserve("gpu-1", "a", 1, 0, "d", 1)
    assert grant is not None
    store.hold(grant)
    await asyncio.sleep(0.9)  # three leases: renewed all along
    assert await store.lookup(grant.id) == grant
    assert await store.release(grant)
    stop.set()
    await renewing


async def test_routing_reads_the_counts_once_then_keeps_them_without_reading(
    redis_client: aioredis.Redis,
) -> None:
    store = SlotStore(redis_client)
    assert store.known_usage(["gpu-1"], "a") is None  # never read: the caller reads
    await store.usage(["gpu-1"], "a")
    grant = await store.try_reserve("gpu-1", "a", 3, 5, "d", 1)
    assert store.known_usage(["gpu-1"], "a") == {"gpu-1": SlotUsage(1, 1)}
    assert grant is not None and await store.release(grant)
    assert store.known_usage(["gpu-1"], "a") == {"gpu-1": SlotUsage(0, 0)}
    # Another replica's grant reaches the view when the counts are read again.
    assert await SlotStore(redis_client).try_reserve("gpu-1", "a", 3, 5, "d", 1)
    assert store.known_usage(["gpu-1"], "a") == {"gpu-1": SlotUsage(0, 0)}
    await store.recent_usage(["gpu-1"], "a", max_age=0)
    assert store.known_usage(["gpu-1"], "a") == {"gpu-1": SlotUsage(1, 1)}
