"""Fixtures: one real Redis per test session, a clean keyspace per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis
from hypothesis import settings as hypothesis_settings

from usher.connections import connect_redis
from usher.testing.redis_server import ExternalRedis, RedisServer, redis_for_tests

# No per-example deadline: on a loaded 2-core machine hypothesis's default 200 ms fails
# examples that are merely slow, and speed is the benchmarks' business, not the tests'.
hypothesis_settings.register_profile("usher", deadline=None)
hypothesis_settings.load_profile("usher")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer | ExternalRedis]:
    server = redis_for_tests()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def redis_client(redis_server: RedisServer | ExternalRedis) -> AsyncIterator[aioredis.Redis]:
    client = connect_redis(redis_server.url)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()
