from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from services.scheduler.store import QueueStore
from usher.queue.records import QueueDefaults


@pytest.fixture
def store(redis_client: aioredis.Redis) -> QueueStore:
    return QueueStore(redis_client, QueueDefaults(max_queue_size=1000))


from collections.abc import AsyncIterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import grpc  # noqa: E402

from services.scheduler.app import SchedulerApp  # noqa: E402
from services.scheduler.settings import SchedulerSettings  # noqa: E402
from usher.auth import parse_token_map  # noqa: E402
from usher.inprocess import LocalChannel  # noqa: E402
from usher.testing import free_port  # noqa: E402
from usher.testing.redis_server import ExternalRedis, RedisServer  # noqa: E402
from usher.v1 import scheduler_pb2_grpc  # noqa: E402

TOKENS = (
    "alice-token=alice@acme,bob-token=bob@acme,carol-token=carol@globex,root-token=root@ops:admin"
)


@dataclass
class SchedulerClient:
    channel: grpc.aio.Channel
    scheduler: scheduler_pb2_grpc.SchedulerServiceAsyncStub
    admin: scheduler_pb2_grpc.SchedulerAdminServiceAsyncStub
    app: SchedulerApp

    @staticmethod
    def auth(user: str) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {user}-token"),)


@pytest.fixture(params=["grpc", "in-process"])
async def scheduler(
    request: pytest.FixtureRequest,
    redis_server: RedisServer | ExternalRedis,
    redis_client: aioredis.Redis,
) -> AsyncIterator[SchedulerClient]:
    """The Scheduler's API as SDK users reach it (gRPC) and as ``usher serve``'s gateway
    calls it (its public service through the in-process channel; admin calls over gRPC)."""
    port = free_port()
    settings = SchedulerSettings(
        redis_url=redis_server.url,
        listen=f"127.0.0.1:{port}",
        tokens=parse_token_map(TOKENS),
        max_queue_size=50,
        reap_interval_seconds=0.05,
        shutdown_grace_seconds=0.5,
    )
    app = SchedulerApp(settings)
    await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    public: grpc.aio.Channel = channel
    if request.param == "in-process":
        public = LocalChannel.serving(app.registrations).as_channel()
    try:
        yield SchedulerClient(
            channel,
            scheduler_pb2_grpc.SchedulerServiceStub(public),
            scheduler_pb2_grpc.SchedulerAdminServiceStub(channel),
            app,
        )
    finally:
        await channel.close()
        await app.stop()
