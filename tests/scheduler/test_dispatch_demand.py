"""The demand a dispatcher believes (which models have queued requests) on a real Redis:
its own submits and claims move it, the poll's reads refresh it without losing either."""

from __future__ import annotations

from typing import Any, cast

import redis.asyncio as aioredis

from services.scheduler.dispatcher import Dispatcher, DispatchSettings
from services.scheduler.quotas import Quotas
from services.scheduler.store import QueueStore
from tests.scheduler.factories import new_request


def dispatcher(store: QueueStore, redis_client: aioredis.Redis) -> Dispatcher:
    # The Pool is never called here: the demand is all these tests look at.
    return Dispatcher(
        store, Quotas(redis_client), DispatchSettings("unused:1", "t"), pool=cast(Any, object())
    )


async def test_a_model_first_queued_after_the_model_set_was_read_keeps_its_count(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    loops = dispatcher(store, redis_client)
    assert await loops.models_with_work() == ({}, {})  # the model set is read (empty)
    await store.submit(new_request(model="fresh"))
    loops.notify_work("fresh")
    # The set read a moment ago did not have the model; the poll still counts it.
    assert await loops.models_with_work() == ({"fresh": 1}, {})


async def test_claims_move_the_demand_and_a_read_corrects_it(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    loops = dispatcher(store, redis_client)
    for _ in range(3):
        await store.submit(new_request(model="m"))
    assert await loops.models_with_work() == ({"m": 3}, {})
    assert await store.claim("m", "test") is not None
    loops._count_work("m", False, -1)  # what a claim here does
    assert loops._demand == ({"m": 2}, {})
    # Another replica claimed one meanwhile: the next read says so.
    assert await store.claim("m", "other") is not None
    assert await loops.models_with_work() == ({"m": 1}, {})
    loops._count_work("m", False, None)  # a claim here found the lane empty
    assert loops._demand == ({}, {})
