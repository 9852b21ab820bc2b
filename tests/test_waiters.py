"""usher.waiters: the oldest parked coroutine that wants what a waker has is woken, alone."""

from __future__ import annotations

import asyncio

from usher.waiters import Waiters


async def test_wake_first_picks_the_oldest_that_wants_it() -> None:
    waiters: Waiters[str] = Waiters()
    woken: list[str] = []

    async def park(name: str, wants: str) -> None:
        await waiters.wait(wants, timeout=5)
        woken.append(name)

    tasks = [asyncio.create_task(park(n, w)) for n, w in [("a", "x"), ("b", "y"), ("c", "y")]]
    await asyncio.sleep(0)
    assert len(waiters) == 3
    assert waiters.wake_first(lambda wants: wants == "y")
    await asyncio.sleep(0.05)
    assert woken == ["b"] and len(waiters) == 2
    assert not waiters.wake_first(lambda wants: wants == "z")
    waiters.wake_all()
    await asyncio.gather(*tasks)
    assert sorted(woken) == ["a", "b", "c"] and len(waiters) == 0


async def test_a_wait_times_out_and_leaves_nothing_behind() -> None:
    waiters: Waiters[None] = Waiters()
    await waiters.wait(None, timeout=0.01)
    assert len(waiters) == 0
