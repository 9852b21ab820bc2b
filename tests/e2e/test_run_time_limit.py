"""The run-time limit of a request through real processes: the Pool's default
(USHER_POOL_REQUEST_TIMEOUT_SECONDS), an instance's own (``request_timeout``) and the
request's (``request_timeout`` on Submit, never longer than the instance allows). Past it
the model server's call is closed and the request fails with DEADLINE_EXCEEDED."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from clients.aio import AsyncUsherClient
from clients.types import RequestState
from usher.testing.stack import LocalStack, StackConfig

pytestmark = pytest.mark.slow

# 100 tokens at 5 a second: an answer takes 20 s unless something cuts it short.
SLOW = ("--tokens-per-second", "5", "--output-tokens", "100:100", "--load-time", "0")


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    config = StackConfig(
        model_servers=(
            ((*SLOW, "--models", "llama3.2:1b"), ";parallel=4;request_timeout=1"),
            ((*SLOW, "--models", "qwen2.5:0.5b"), ";parallel=4"),
        ),
        pool_env={"USHER_POOL_REQUEST_TIMEOUT_SECONDS": "2.5"},
    )
    with LocalStack(config) as running:
        yield running


@pytest.fixture
async def client(stack: LocalStack) -> AsyncIterator[AsyncUsherClient]:
    async with AsyncUsherClient(
        stack.scheduler_address, stack.notifier_address, token="alice-token"
    ) as running:
        yield running


async def in_flight(url: str) -> int:
    async with httpx.AsyncClient() as http:
        return int((await http.get(f"{url}/_emulator/stats")).json()["in_flight"])


@pytest.mark.parametrize(
    ("model", "server", "requested", "limit"),
    [
        ("qwen2.5:0.5b", 1, None, "2.5s"),  # the Pool's default
        ("llama3.2:1b", 0, None, "1s"),  # the instance's own limit
        ("qwen2.5:0.5b", 1, 0.5, "0.5s"),  # the request's, shorter than the default
        ("llama3.2:1b", 0, 30.0, "1s"),  # the request cannot outlast its instance's limit
    ],
)
async def test_a_request_past_its_run_time_limit_ends_deadline_exceeded_and_the_call_closes(
    client: AsyncUsherClient,
    stack: LocalStack,
    model: str,
    server: int,
    requested: float | None,
    limit: str,
) -> None:
    options = {} if requested is None else {"request_timeout": requested}
    began = time.monotonic()
    final = await client.submit_and_wait(
        model,
        "a long story",
        wait_timeout=30,
        check=False,
        **options,  # type: ignore[arg-type]
    )
    assert final.state == RequestState.FAILED
    assert final.error.startswith("DEADLINE_EXCEEDED")
    assert f"run-time limit of {limit}" in final.error
    assert time.monotonic() - began < 15  # well before the 20 s the answer would take
    # The model server saw its call closed: nothing of it runs there any more.
    for _ in range(100):
        if await in_flight(stack.model_urls[server]) == 0:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the model server still runs the request")
