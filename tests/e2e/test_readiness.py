"""Readiness through real processes: every service stays alive (grpc.health.v1 "") while
what it needs is away, but is ready ("readiness") only while Redis answers, and the Pool
only while at least one instance serves; the gateway's /health follows their readiness."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from usher.readiness import READINESS_SERVICE
from usher.testing.stack import LocalStack, StackConfig

pytestmark = pytest.mark.slow
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    config = StackConfig(
        emulator_args=("--instant", "--parallel", "2"),
        model_server_processes=1,
        pool_env={"USHER_POOL_HEALTH_INTERVAL_SECONDS": "0.2"},
        gateway=True,
    )
    with LocalStack(config) as running:
        yield running


async def status(address: str, service: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
        except grpc.aio.AioRpcError:
            return -1
        return int(reply.status)


async def eventually(address: str, service: str, want: bool, timeout: float = 15.0) -> None:
    for _ in range(int(timeout / 0.1)):
        if (await status(address, service) == SERVING) == want:
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"{address} {service or 'liveness'} never became {'' if want else 'not '}serving")


async def gateway_health(stack: LocalStack) -> int:
    async with httpx.AsyncClient() as http:
        return (await http.get(f"{stack.gateway_url}/health", timeout=10)).status_code


async def test_readiness_follows_redis_and_serving_instances_while_liveness_stays(
    stack: LocalStack,
) -> None:
    services = [stack.scheduler_address, stack.notifier_address, stack.pool_address]
    for address in services:
        await eventually(address, READINESS_SERVICE, True)
    assert await gateway_health(stack) == 200

    # No instance serves: the Pool is not ready (the Scheduler still queues).
    stack.model_servers[0].kill()
    await eventually(stack.pool_address, READINESS_SERVICE, False)
    assert await status(stack.pool_address, "") == SERVING
    assert await status(stack.scheduler_address, READINESS_SERVICE) == SERVING
    assert await gateway_health(stack) == 503
    stack.restart_model_server(0)
    await eventually(stack.pool_address, READINESS_SERVICE, True)
    assert await gateway_health(stack) == 200

    # Redis away: nothing is ready, everything is alive.
    assert stack.redis is not None
    stack.redis.kill()
    try:
        for address in services:
            await eventually(address, READINESS_SERVICE, False)
            assert await status(address, "") == SERVING
    finally:
        stack.redis.restart()
    for address in services:
        await eventually(address, READINESS_SERVICE, True)
