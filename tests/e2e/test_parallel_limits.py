"""Per-model parallel limits through real processes: set at runtime with the gateway's
``/admin/queue/update`` ``parallel_limit`` (the Scheduler's UpdateQueueConfig.parallel),
enforced by the Pool on every instance; until set, each instance's own ``parallel``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from clients.aio import AsyncUsherClient
from usher.testing.stack import LocalStack, StackConfig

pytestmark = pytest.mark.slow
MODEL = "llama3.2:1b"
ADMIN = {"Authorization": "Bearer admin-token"}


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    config = StackConfig(
        model_servers=(
            (
                ("--tokens-per-second", "40", "--output-tokens", "20:20", "--parallel", "4"),
                ";parallel=4",
            ),
        ),
        pool_env={"USHER_POOL_HEALTH_INTERVAL_SECONDS": "0.2"},
        gateway=True,
    )
    with LocalStack(config) as running:
        yield running


async def most_at_once(stack: LocalStack, requests: int) -> int:
    """Run ``requests`` at once; the most the model server ran together."""
    server = stack.model_urls[0]
    async with httpx.AsyncClient() as http:
        await http.delete(f"{server}/_emulator/stats")
    async with AsyncUsherClient(
        stack.scheduler_address, stack.notifier_address, token="alice-token"
    ) as client:
        await asyncio.gather(
            *(client.submit_and_wait(MODEL, f"n{i}", wait_timeout=60) for i in range(requests))
        )
    async with httpx.AsyncClient() as http:
        stats: dict[str, Any] = (await http.get(f"{server}/_emulator/stats")).json()
    return int(stats["models"][MODEL]["in_flight_max"])


async def set_limit(stack: LocalStack, limit: int) -> None:
    async with httpx.AsyncClient(base_url=stack.gateway_url) as http:
        reply = await http.post(
            "/admin/queue/update", json={"model": MODEL, "parallel_limit": limit}, headers=ADMIN
        )
    assert reply.status_code == 200 and reply.json()["parallel_limit"] == limit
    await asyncio.sleep(1.0)  # the Pool's next health passes pick it up


async def test_a_models_parallel_limit_set_at_runtime_caps_what_runs_at_once(
    stack: LocalStack,
) -> None:
    assert await most_at_once(stack, 6) == 4  # the instance's own parallel
    await set_limit(stack, 1)
    assert await most_at_once(stack, 4) == 1
    await set_limit(stack, 3)
    assert await most_at_once(stack, 6) == 3
