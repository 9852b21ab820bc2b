"""A dispatcher whose claim fails after the Pool granted it a slot, on real servers: the
Pool (gRPC, real Redis, an emulated Ollama) and the Scheduler's own Redis, killed first."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from services.scheduler.dispatcher import Dispatcher, DispatchSettings
from services.scheduler.quotas import Quotas
from services.scheduler.store import QueueStore
from tests.pool.conftest import fast_emulator_config
from tests.pool.test_pool_service import MODEL, running_pool, settings_for, slots_held
from tests.scheduler.factories import new_request
from tests.scheduler.on_a_pool import dispatcher_on_a_pool, reserve
from usher.emulator import EmulatorFleet
from usher.queue.records import RUNNING
from usher.testing.redis_server import ExternalRedis, RedisServer
from usher.v1 import request_pb2


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


async def test_a_submit_awaiting_the_end_has_it_though_the_completion_is_not_written(
    redis_server: RedisServer | ExternalRedis, redis_client: aioredis.Redis
) -> None:
    """A Submit waiting for its request's end is answered as the completion goes out, not
    after. When the completion then cannot be written (here the lease was taken over while
    the answer was generated), the caller keeps its answer and the request is not lost:
    its new holder has it."""
    async with dispatcher_on_a_pool(
        redis_server.url, redis_client, time_to_first_token=0.3
    ) as loops:
        store = loops.store
        await store.submit(new_request(model=MODEL))
        lease = await store.claim(MODEL, loops.holder)
        assert lease is not None
        slot = await reserve(loops, MODEL)
        ended = loops._await_end(lease.request.id)
        running = asyncio.create_task(loops.run_request(lease, slot))
        await asyncio.sleep(0.1)  # generating: the lease lapses, another replica takes it
        assert await store.requeue(lease, "lease lapsed")
        taken = await store.claim(MODEL, "elsewhere")
        assert taken is not None and taken.request.id == lease.request.id
        assert await running is None  # its completion was refused: not its lease
        end = await ended
        assert end is not None and end.state == request_pb2.REQUEST_STATE_COMPLETED and end.result
        held = await store.inspect(MODEL, lease.request.id)
        assert held is not None and held.state == RUNNING and held.lease_token == taken.token
