"""Fixtures: a queue store on the test Redis, and a Notifier served in this process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
import redis.asyncio as aioredis

from services.notifier.app import NotifierApp
from services.notifier.settings import NotifierSettings
from services.scheduler.store import QueueStore
from usher.auth import parse_token_map
from usher.inprocess import LocalChannel
from usher.queue.records import QueueDefaults
from usher.testing import free_port
from usher.testing.redis_server import ExternalRedis, RedisServer
from usher.v1 import notifier_pb2_grpc

TOKENS = (
    "alice-token=alice@acme,bob-token=bob@acme,root-token=root@ops:admin,"
    "service-token=gateway@usher:service"
)


@pytest.fixture
def store(redis_client: aioredis.Redis) -> QueueStore:
    return QueueStore(redis_client, QueueDefaults(max_queue_size=1000))


@dataclass
class NotifierClient:
    app: NotifierApp
    stub: notifier_pb2_grpc.NotifierServiceAsyncStub

    @staticmethod
    def auth(user: str) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {user}-token"),)


@pytest.fixture(params=["grpc", "in-process"])
async def notifier(
    request: pytest.FixtureRequest,
    redis_server: RedisServer | ExternalRedis,
    redis_client: aioredis.Redis,
) -> AsyncIterator[NotifierClient]:
    """The Notifier as SDK users reach it (gRPC) and as ``usher serve``'s gateway calls it
    (through the in-process channel)."""
    port = free_port()
    app = NotifierApp(
        NotifierSettings(
            redis_url=redis_server.url,
            listen=f"127.0.0.1:{port}",
            tokens=parse_token_map(TOKENS),
            position_interval_seconds=0.05,
            heap_freeze_seconds=0,
            shutdown_grace_seconds=0.5,
        )
    )
    await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    calls: grpc.aio.Channel = channel
    if request.param == "in-process":
        calls = LocalChannel.serving(app.registrations).as_channel()
    try:
        yield NotifierClient(app, notifier_pb2_grpc.NotifierServiceStub(calls))
    finally:
        await channel.close()
        await app.stop()
