"""The Coalescer's linger: a batch started when none was under way waits for the calls that
follow it."""

from __future__ import annotations

import asyncio

from usher.batching import Coalescer


async def test_a_lingering_batch_takes_the_calls_made_meanwhile() -> None:
    batches: list[list[int]] = []

    async def run(items: list[int]) -> list[int]:
        batches.append(items)
        return [item * 2 for item in items]

    lingering = Coalescer(run, 10, linger=0.05)
    first = lingering.submit(1)
    await asyncio.sleep(0.01)
    second = lingering.submit(2)
    assert list(await asyncio.gather(first, second)) == [2, 4]
    assert batches == [[1, 2]]
    # Without a linger, the first goes alone at once.
    eager = Coalescer(run, 10)
    alone = eager.submit(3)
    await asyncio.sleep(0.01)
    assert alone.done() and batches[-1] == [3]
