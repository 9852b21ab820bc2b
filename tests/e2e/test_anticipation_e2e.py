"""Anticipatory idling through real processes, the trio and ``usher serve``: a light tenant
asking again after each answer while a heavy one floods gets the slot its answer freed
(usher_slot_holds_total counts the holds its requests were claimed on)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import httpx
import pytest

from clients.aio import AsyncUsherClient
from usher.testing.stack import LocalStack, StackConfig

pytestmark = pytest.mark.slow
MODEL = "llama3.2:1b"
FLOOD = 60  # about 1.5 s of work on two slots: queued while carol asks
LIGHT = 5
#: Two slots, about 50 ms per answer (5 tokens at 100 tokens/s).
EMULATOR_ARGS = (
    *("--fleet", "1", "--tokens-per-second", "100", "--output-tokens", "5:5"),
    *("--ttft", "0", "--load-time", "0", "--parallel", "2"),
)
_ARRIVED = re.compile(r'usher_slot_holds_total\{[^}]*outcome="arrived"[^}]*\} ([0-9.e+]+)')


@pytest.fixture(scope="module", params=["trio", "serve"])
def stack(request: pytest.FixtureRequest) -> Iterator[LocalStack]:
    config = StackConfig(
        all_in_one=request.param == "serve",
        emulator_args=EMULATOR_ARGS,
        instance_options=";parallel=2",
        # A window far longer than any client's way back here: whether a hold is taken
        # does not depend on this machine's speed.
        scheduler_env={"USHER_DISPATCH_IDLE_SECONDS": "1", "USHER_DEFAULT_PARALLEL": "2"},
        metrics=True,
    )
    with LocalStack(config) as running:
        yield running


def client(stack: LocalStack, token: str) -> AsyncUsherClient:
    return AsyncUsherClient(stack.scheduler_address, stack.notifier_address, token=token)


async def holds_arrived(stack: LocalStack) -> float:
    async with httpx.AsyncClient(timeout=5) as http:
        text = (await http.get(stack.metrics_urls["scheduler-0"])).text
    return sum(float(count) for count in _ARRIVED.findall(text))


async def test_a_light_tenant_under_a_flood_gets_the_slot_its_answer_freed(
    stack: LocalStack,
) -> None:
    before = await holds_arrived(stack)
    async with (
        client(stack, "alice-token") as alice,
        client(stack, "carol-token") as carol,
    ):
        flood = [
            asyncio.create_task(alice.submit_and_wait(MODEL, f"flood {n}", wait_timeout=60))
            for n in range(FLOOD)
        ]
        await asyncio.sleep(0.3)  # the flood is queued
        for n in range(LIGHT):
            await carol.submit_and_wait(MODEL, f"light {n}", wait_timeout=60)
        await asyncio.gather(*flood)
    # Her first answer measures nothing yet (no think time known) and her last has no next
    # request: the ones between were each claimed on the slot held for her.
    assert await holds_arrived(stack) - before >= LIGHT - 2
