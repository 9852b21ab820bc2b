"""Routing settings through real processes: weighted round robin's shares per model under
sequential and concurrent load, and instance roles (chat hosts, embedding hosts)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import pytest

from clients.aio import AsyncUsherClient
from usher.testing.stack import LocalStack, StackConfig

pytestmark = pytest.mark.slow

FAST = ("--instant", "--parallel", "32", "--output-tokens", "2:4")
MODELS = ("--models", "llama3.2:1b,qwen2.5:0.5b,nomic-embed-text")


@pytest.fixture(scope="module")
def wrr_stack() -> Iterator[LocalStack]:
    config = StackConfig(
        model_servers=(
            ((*FAST, *MODELS), ";weight=3;parallel=32"),
            ((*FAST, *MODELS), ";weight=1;parallel=32"),
        ),
        pool_env={"USHER_POOL_STRATEGY": "weighted_round_robin"},
        scheduler_env={"USHER_DISPATCH_CONCURRENCY": "16"},
    )
    with LocalStack(config) as running:
        yield running


@pytest.fixture
async def wrr_client(wrr_stack: LocalStack) -> AsyncIterator[AsyncUsherClient]:
    async with AsyncUsherClient(
        wrr_stack.scheduler_address, wrr_stack.notifier_address, token="alice-token"
    ) as client:
        yield client


def assert_shares(counts: Counter[str], weights: dict[str, float], total: int) -> None:
    assert sum(counts.values()) == total
    weight_sum = sum(weights.values())
    for instance, weight in weights.items():
        expected = total * weight / weight_sum
        assert abs(counts[instance] - expected) <= 0.1 * expected, (counts, weights)


async def test_weighted_round_robin_rotates_sequential_requests_by_weight(
    wrr_client: AsyncUsherClient,
) -> None:
    counts: Counter[str] = Counter()
    for i in range(200):
        done = await wrr_client.submit_and_wait("llama3.2:1b", f"sequential {i}", wait_timeout=30)
        assert done.result is not None
        counts[done.result.served_by_instance] += 1
    assert_shares(counts, {"ollama-0": 3, "ollama-1": 1}, 200)


async def test_weighted_round_robin_rotates_concurrent_requests_by_weight_per_model(
    wrr_client: AsyncUsherClient,
) -> None:
    # Two models at once: each rotates through the instances on its own.
    async def one(model: str, i: int) -> tuple[str, str]:
        done = await wrr_client.submit_and_wait(model, f"concurrent {i}", wait_timeout=60)
        assert done.result is not None
        return model, done.result.served_by_instance

    results = await asyncio.gather(
        *(one("llama3.2:1b" if i % 2 else "qwen2.5:0.5b", i) for i in range(200))
    )
    for model in ("llama3.2:1b", "qwen2.5:0.5b"):
        counts = Counter(instance for m, instance in results if m == model)
        assert_shares(counts, {"ollama-0": 3, "ollama-1": 1}, 100)


@pytest.fixture(scope="module")
def roles_stack() -> Iterator[LocalStack]:
    config = StackConfig(
        model_servers=(
            ((*FAST, *MODELS), ";roles=chat"),
            ((*FAST, *MODELS), ";roles=embedding"),
        ),
    )
    with LocalStack(config) as running:
        yield running


async def test_roles_send_chat_to_chat_hosts_and_embeddings_to_embedding_hosts(
    roles_stack: LocalStack,
) -> None:
    async with AsyncUsherClient(
        roles_stack.scheduler_address, roles_stack.notifier_address, token="alice-token"
    ) as client:

        async def chat(i: int) -> str:
            done = await client.submit_and_wait(
                "llama3.2:1b", messages=[{"role": "user", "content": f"hi {i}"}], wait_timeout=30
            )
            assert done.result is not None
            return done.result.served_by_instance

        async def embed(i: int) -> str:
            done = await client.submit_and_wait(
                "nomic-embed-text:latest", embed=[f"text {i}"], wait_timeout=30
            )
            assert done.result is not None and done.result.embeddings
            return done.result.served_by_instance

        chats = await asyncio.gather(*(chat(i) for i in range(20)))
        embeds = await asyncio.gather(*(embed(i) for i in range(20)))
    assert set(chats) == {"ollama-0"}
    assert set(embeds) == {"ollama-1"}
