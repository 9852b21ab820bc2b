"""A dispatcher whose claim fails after the Pool granted it a slot, on real servers: the
Pool (gRPC, real Redis, an emulated Ollama) and the Scheduler's own Redis, killed first."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from services.scheduler.dispatcher import Dispatcher, DispatchSettings
from services.scheduler.quotas import Quotas
from services.scheduler.store import QueueStore
from tests.pool.conftest import fast_emulator_config
from tests.pool.test_pool_service import MODEL, running_pool, settings_for, slots_held
from usher.emulator import EmulatorFleet
from usher.testing.redis_server import ExternalRedis, RedisServer


async def test_a_claim_that_fails_hands_the_slot_back_at_once(
    redis_server: RedisServer | ExternalRedis, redis_client: aioredis.Redis
) -> None:
    gone = RedisServer().start()
    queue_redis = aioredis.Redis.from_url(gone.url, socket_connect_timeout=1)
    gone.kill()  # Redis away as the claim goes out (no connection to be had, in a burst)
    async with EmulatorFleet([fast_emulator_config()]) as fleet:
        settings = settings_for(redis_server.url, fleet.urls)
        async with running_pool(settings) as pool:
            loops = Dispatcher(
                QueueStore(queue_redis),
                Quotas(queue_redis),
                DispatchSettings(settings.listen, "svc-token", reserve_wait_seconds=2),
                pool=pool.stub,
            )
            loops.notify_work(MODEL)  # a request of the model believed queued
            with pytest.raises(redis.exceptions.ConnectionError):
                await loops.dispatch_one()
            # Not left taken until its lease lapsed (30 s): free for the next request.
            assert await slots_held(redis_client) == 0
            await loops.aclose()
    await queue_redis.aclose()
