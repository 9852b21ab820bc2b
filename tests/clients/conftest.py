"""One running Usher for the client tests: Redis, an emulated Ollama instance (two slots),
Pool, Scheduler and Notifier, each its own process.

Every answer is 300 tokens long unless ``num_predict`` cuts it, at 100 tokens per second,
so a test picks how long its requests run: ``num_predict=20`` takes 0.2 s, 250 takes 2.5 s.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from clients.aio import AsyncUsherClient
from clients.retry import RetryPolicy
from usher.testing.stack import LocalStack, StackConfig


@pytest.fixture(scope="package")
def stack() -> Iterator[LocalStack]:
    config = StackConfig(
        emulator_args=(
            "--fleet",
            "1",
            "--tokens-per-second",
            "100",
            "--load-time",
            "0.05",
            "--parallel",
            "2",
            "--output-tokens",
            "300:300",
        ),
        instance_options=";parallel=2",
        # Leases of 3 s: dispatchers heartbeat every second, and a heartbeat is where a
        # running request learns it was cancelled.
        scheduler_env={"USHER_DISPATCH_CONCURRENCY": "4", "USHER_LEASE_SECONDS": "3"},
    )
    with LocalStack(config) as running:
        yield running


def _client(stack: LocalStack, token: str, retry: RetryPolicy | None = None) -> AsyncUsherClient:
    return AsyncUsherClient(
        stack.scheduler_address,
        stack.notifier_address,
        pool_address=stack.pool_address,
        token=token,
        retry=retry or RetryPolicy(max_total_wait=15.0),
    )


@pytest.fixture
async def alice(stack: LocalStack) -> AsyncIterator[AsyncUsherClient]:
    async with _client(stack, "alice-token") as client:
        yield client


@pytest.fixture
async def bob(stack: LocalStack) -> AsyncIterator[AsyncUsherClient]:
    async with _client(stack, "bob-token") as client:
        yield client


@pytest.fixture
async def operator(stack: LocalStack) -> AsyncIterator[AsyncUsherClient]:
    async with _client(stack, "admin-token") as client:
        yield client
