"""Slot leases on a real Redis: limits hold across replicas, dead holders' slots come back."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from services.pool.slots import SlotStore
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
    store = SlotStore(redis_client, lease_ms=60)
    kept = await store.try_reserve("gpu-1", "a", 1, 0, "alive", 1)
    assert kept is not None
    assert (await store.lookup(kept.id)) == kept
    for _ in range(3):
        await asyncio.sleep(0.03)
        assert await store.renew(kept)
    assert await store.try_reserve("gpu-1", "a", 1, 0, "other", 1) is None
    await asyncio.sleep(0.1)  # the holder stops renewing: it died
    taken = await store.try_reserve("gpu-1", "a", 1, 0, "other", 1)
    assert taken is not None
    assert not await store.renew(kept)
    assert await store.lookup(kept.id) is None
