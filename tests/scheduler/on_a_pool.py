"""A dispatcher whose Pool is real (gRPC, on the test's Redis, an emulated Ollama), for the
tests of what it does with the Pool's slots and calls."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

from services.scheduler.dispatcher import Dispatcher, DispatchSettings
from services.scheduler.quotas import Quotas
from services.scheduler.store import QueueStore
from tests.pool.conftest import fast_emulator_config
from tests.pool.test_pool_service import running_pool, settings_for
from usher.emulator import EmulatorFleet
from usher.v1 import pool_pb2


@contextlib.asynccontextmanager
async def dispatcher_on_a_pool(
    redis_url: str, redis_client: aioredis.Redis, **emulator: Any
) -> AsyncIterator[Dispatcher]:
    """A Dispatcher (its store and quotas on ``redis_client``) calling a Pool on
    ``redis_url`` in front of one emulated Ollama (``fast_emulator_config(**emulator)``);
    its loops are not running: the test drives them."""
    async with EmulatorFleet([fast_emulator_config(**emulator)]) as fleet:
        settings = settings_for(redis_url, fleet.urls)
        async with running_pool(settings) as pool:
            loops = Dispatcher(
                QueueStore(redis_client),
                Quotas(redis_client),
                DispatchSettings(settings.listen, "svc-token"),
                pool=pool.stub,
            )
            try:
                yield loops
            finally:
                await loops.aclose()


async def reserve(loops: Dispatcher, model: str) -> pool_pb2.Slot:
    """A slot of ``model`` from the dispatcher's Pool, as a loop reserves one."""
    reply = await loops._pool.Reserve(
        pool_pb2.ReserveRequest(models=[model], holder=loops.holder), metadata=loops._metadata
    )
    return reply.slot
