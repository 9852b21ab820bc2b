"""A real Scheduler on a socket with the settings and callers a hostile-tenant test needs."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from services.scheduler.app import SchedulerApp
from services.scheduler.settings import SchedulerSettings
from usher.auth import Principal
from usher.testing import free_port
from usher.v1 import scheduler_pb2_grpc

#: token → caller. The org/user pairs that collide when joined unescaped are both here.
CALLERS: dict[str, Principal] = {
    "alice": Principal("alice", "acme"),
    "mallory": Principal("alice:zz", "acme"),
    "ab-c": Principal("c", "a/b"),
    "a-bc": Principal("b/c", "a"),
    "bob": Principal("bob", "acme"),
    "root": Principal("root", "ops", frozenset({"admin"})),
}


def auth(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


@dataclass
class Scheduler:
    app: SchedulerApp
    scheduler: scheduler_pb2_grpc.SchedulerServiceAsyncStub
    admin: scheduler_pb2_grpc.SchedulerAdminServiceAsyncStub


@contextlib.asynccontextmanager
async def running_scheduler(
    redis_url: str, callers: Mapping[str, Principal] = CALLERS, **overrides: Any
) -> AsyncIterator[Scheduler]:
    port = free_port()
    base = SchedulerSettings(
        redis_url=redis_url,
        listen=f"127.0.0.1:{port}",
        tokens=dict(callers),
        max_queue_size=100,
        reap_interval_seconds=0.05,
        shutdown_grace_seconds=0.5,
    )
    app = SchedulerApp(base.replace(**overrides))
    await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Scheduler(
            app,
            scheduler_pb2_grpc.SchedulerServiceStub(channel),
            scheduler_pb2_grpc.SchedulerAdminServiceStub(channel),
        )
    finally:
        await channel.close()
        await app.stop()
