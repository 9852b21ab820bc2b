"""Models that left the fleet leave nothing behind: their keys expire and no loop walks
them any more (the probe's 2,000 made-up models kept every idle loop busy for ever)."""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from services.scheduler.reaper import reap_once, retire_departed
from tests.scheduler.factories import generate_submit
from tests.security.conftest import auth, running_scheduler
from usher import keys
from usher.keys import ModelKeys
from usher.testing.redis_server import ExternalRedis, RedisServer
from usher.v1 import scheduler_pb2

STAYS, LEAVES = "llama3.2", "gone:1b"


async def offer(redis_client: aioredis.Redis, *models: str) -> None:
    await redis_client.delete(keys.POOL_CATALOGUE)
    now_ms = int(time.time() * 1000)
    await redis_client.hset(keys.POOL_CATALOGUE, mapping=dict.fromkeys(models, now_ms))


async def persistent_keys(redis_client: aioredis.Redis, model: str) -> list[str]:
    """The model's own keys (not its requests') that have no expiry."""
    base = ModelKeys(model).base
    found = []
    async for raw in redis_client.scan_iter(
        match=base.replace("{", "\\{").replace("}", "\\}") + "*"
    ):
        name = raw.decode()
        if ":req:" not in name and await redis_client.ttl(name) == -1:
            found.append(name)
    return found


async def test_a_model_that_left_the_fleet_expires_and_is_walked_no_more(
    redis_server: RedisServer | ExternalRedis, redis_client: aioredis.Redis
) -> None:
    await offer(redis_client, STAYS, LEAVES)
    async with running_scheduler(redis_server.url) as s:
        store = s.app.store
        for model in (STAYS, LEAVES):
            sent = await s.scheduler.Submit(generate_submit(model=model), metadata=auth("alice"))
        await s.scheduler.Cancel(
            scheduler_pb2.CancelRequest(id=sent.request.id), metadata=auth("alice")
        )
        assert await persistent_keys(redis_client, LEAVES)

        await offer(redis_client, STAYS)
        assert await retire_departed(store) == [LEAVES]
        assert await store.models() == [STAYS]
        assert await persistent_keys(redis_client, LEAVES) == []
        assert await redis_client.ttl(ModelKeys(LEAVES).stats) > 0
        assert set(await reap_once(store)) == {STAYS}
        assert await retire_departed(store) == []  # a model still served stays

        # Back in the fleet before its keys expired: they are kept again.
        await offer(redis_client, STAYS, LEAVES)
        await s.scheduler.Submit(
            generate_submit(model=LEAVES, prompt="again"), metadata=auth("alice")
        )
        assert LEAVES in await store.models()
        assert not await redis_client.exists(ModelKeys(LEAVES).retired)
        assert await redis_client.ttl(ModelKeys(LEAVES).stats) == -1


async def test_a_departed_model_with_work_is_kept_until_it_is_done(
    redis_server: RedisServer | ExternalRedis, redis_client: aioredis.Redis
) -> None:
    await offer(redis_client, STAYS, LEAVES)
    async with running_scheduler(redis_server.url) as s:
        await s.admin.PauseQueue(
            scheduler_pb2.PauseQueueRequest(model=LEAVES, paused=True), metadata=auth("root")
        )
        sent = await s.scheduler.Submit(generate_submit(model=LEAVES), metadata=auth("alice"))
        await offer(redis_client, STAYS)
        assert await retire_departed(s.app.store) == []
        assert LEAVES in await s.app.store.models()
        await s.scheduler.Cancel(
            scheduler_pb2.CancelRequest(id=sent.request.id), metadata=auth("alice")
        )
        assert await retire_departed(s.app.store) == [LEAVES]
