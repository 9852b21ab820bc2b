"""No accepted request is lost when a scheduler replica is SIGKILLed or Redis restarts.

Real processes, real signals: the scheduler runs as ``python -m services.scheduler`` and Redis
as its own redis-server with ``appendfsync always``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from services.scheduler.store import QueueStore
from tests.scheduler.conftest import TOKENS
from tests.scheduler.factories import generate_submit
from usher.connections import connect_redis
from usher.queue.records import QueueDefaults
from usher.testing import RedisServer, ServiceProcess, free_port
from usher.v1 import request_pb2, scheduler_pb2, scheduler_pb2_grpc

pytestmark = pytest.mark.slow
AUTH = (("authorization", "Bearer alice-token"),)


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    with RedisServer(appendfsync="always") as server:
        yield server


def scheduler_process(redis_url: str, port: int, tmp_log: str) -> ServiceProcess:
    return ServiceProcess(
        "services.scheduler",
        port,
        {
            "USHER_REDIS_URL": redis_url,
            "USHER_SCHEDULER_LISTEN": f"127.0.0.1:{port}",
            "USHER_API_TOKENS": TOKENS,
            "USHER_QUEUE_MAX_SIZE": "100000",
            "USHER_LEASE_SECONDS": "1",
            "USHER_REAP_INTERVAL_SECONDS": "0.1",
            "USHER_LOG_LEVEL": "warning",
        },
        log_path=tmp_log,
    )


@contextlib.asynccontextmanager
async def stub_for(port: int) -> AsyncIterator[scheduler_pb2_grpc.SchedulerServiceAsyncStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield scheduler_pb2_grpc.SchedulerServiceStub(channel)
    finally:
        await channel.close()


async def submit_until(
    port: int, stop: asyncio.Event, accepted: list[str], refused: list[str], worker: int
) -> None:
    """Submit as fast as possible, as a careful client does: each request keeps its
    idempotency key across retries until acknowledged, so none is queued twice."""
    n = 0
    async with stub_for(port) as stub:
        while not stop.is_set():
            n += 1
            request = generate_submit(prompt=f"w{worker} #{n}")
            request.idempotency_key = f"w{worker}-{n}"
            while True:
                try:
                    reply = await stub.Submit(request, metadata=AUTH, timeout=2)
                    accepted.append(reply.request.id)
                    break
                except grpc.aio.AioRpcError as error:
                    refused.append(error.code().name)
                    await asyncio.sleep(0.05)


async def grown(accepted: list[str], by: int, timeout: float = 60.0) -> None:
    """Wait until ``by`` more submits were accepted."""
    target = len(accepted) + by
    deadline = time.monotonic() + timeout
    while len(accepted) < target:
        assert time.monotonic() < deadline, f"only {len(accepted)} of {target} accepted"
        await asyncio.sleep(0.02)


async def assert_all_present(redis_url: str, ids: list[str]) -> None:
    client = connect_redis(redis_url)
    try:
        store = QueueStore(client, QueueDefaults())
        missing = [i for i in ids if await store.get(i) is None]
        assert missing == [], f"{len(missing)} of {len(ids)} accepted requests lost"
        # Exactly the acknowledged requests: none lost, none queued twice.
        assert len(set(ids)) == len(ids)
        assert await store.queue_length("llama3.2") == len(ids)
    finally:
        await client.aclose()


async def test_sigkill_the_scheduler_mid_load_loses_nothing(
    own_redis: RedisServer, tmp_path: object
) -> None:
    port = free_port()
    log = os.path.join(str(tmp_path), "scheduler.log")
    accepted: list[str] = []
    refused: list[str] = []
    process = scheduler_process(own_redis.url, port, log).start()
    try:
        stop = asyncio.Event()
        load = [
            asyncio.create_task(submit_until(port, stop, accepted, refused, w)) for w in range(8)
        ]
        for _round in range(3):
            # Kill only while submits are flowing (a busy machine is slower to accept).
            await grown(accepted, by=30 + random.randrange(10))
            process.kill()  # SIGKILL mid-load
            await asyncio.sleep(0.2)
            process = scheduler_process(own_redis.url, port, log).start()
        await grown(accepted, by=15)
        stop.set()
        await asyncio.gather(*load)
        assert len(accepted) > 100
        assert "UNAVAILABLE" in refused
        assert {"UNAVAILABLE", "DEADLINE_EXCEEDED"} >= set(refused)
        await assert_all_present(own_redis.url, accepted)
    finally:
        process.terminate()


LEASE_HOLDER = """
import asyncio, sys
from services.scheduler.store import QueueStore
from usher.queue.records import QueueDefaults
from usher.connections import connect_redis

async def main():
    store = QueueStore(connect_redis(sys.argv[1]), QueueDefaults(lease_ms=800))
    held = []
    while True:
        lease = await store.claim("llama3.2", "doomed")
        if lease is None:
            break
        held.append(lease)
    print(len(held), flush=True)
    while True:  # heartbeat forever, never finish: only SIGKILL ends this
        for lease in held:
            await store.heartbeat(lease)  # its lease: 800 ms
        await asyncio.sleep(0.2)

asyncio.run(main())
"""


async def test_a_killed_dispatcher_leaves_leases_that_come_back(
    own_redis: RedisServer, tmp_path: object
) -> None:
    port = free_port()
    process = scheduler_process(own_redis.url, port, os.path.join(str(tmp_path), "s.log")).start()
    try:
        async with stub_for(port) as stub:
            ids = [
                (await stub.Submit(generate_submit(prompt=f"job {i}"), metadata=AUTH)).request.id
                for i in range(20)
            ]
            holder = subprocess.Popen(  # noqa: ASYNC220 (started once, killed below)
                [sys.executable, "-c", LEASE_HOLDER, own_redis.url], stdout=subprocess.PIPE
            )
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == b"20"
            running = await stub.Get(scheduler_pb2.GetRequest(id=ids[0]), metadata=AUTH)
            assert running.request.state == request_pb2.REQUEST_STATE_RUNNING
            await asyncio.sleep(1.0)  # heartbeats keep the leases past their 0.8 s
            still = await stub.Get(scheduler_pb2.GetRequest(id=ids[0]), metadata=AUTH)
            assert still.request.state == request_pb2.REQUEST_STATE_RUNNING
            holder.send_signal(signal.SIGKILL)
            holder.wait()
            await asyncio.sleep(1.5)
            back = [await stub.Get(scheduler_pb2.GetRequest(id=i), metadata=AUTH) for i in ids]
            assert all(b.request.state == request_pb2.REQUEST_STATE_QUEUED for b in back)
            assert [b.request.position.position for b in back] == list(range(1, 21))
    finally:
        process.terminate()


async def test_redis_restart_loses_no_accepted_request(
    own_redis: RedisServer, tmp_path: object
) -> None:
    port = free_port()
    process = scheduler_process(own_redis.url, port, os.path.join(str(tmp_path), "s.log")).start()
    accepted: list[str] = []
    refused: list[str] = []
    try:
        stop = asyncio.Event()
        load = [
            asyncio.create_task(submit_until(port, stop, accepted, refused, w)) for w in range(8)
        ]
        await grown(accepted, 25)  # under load: conditions, not clocks (a busy machine)
        own_redis.kill()  # SIGKILL Redis mid-load; AOF (fsync always) holds every ack
        await asyncio.sleep(0.3)
        own_redis.start()
        await grown(accepted, 25)  # the same process carries on once Redis is back
        stop.set()
        await asyncio.gather(*load)
        # The same scheduler process carries on once Redis is back.
        async with stub_for(port) as stub:
            reply = await stub.Submit(generate_submit(prompt="after"), metadata=AUTH)
            accepted.append(reply.request.id)
        assert {"UNAVAILABLE", "DEADLINE_EXCEEDED"} >= set(refused)
        await assert_all_present(own_redis.url, accepted)
    finally:
        process.terminate()
