"""A request's heartbeat stops when its request ends, even if the cancel gets lost."""

from __future__ import annotations

import asyncio
import contextlib
import time

from services.scheduler.dispatcher import _Cancelled, _stop_heartbeat


async def test_a_heartbeat_that_swallows_its_cancel_still_stops() -> None:
    turns = 0

    async def stubborn(ended: asyncio.Event) -> _Cancelled | None:
        # What a Redis call that turns a cancel into a timeout and retries looks like.
        nonlocal turns
        while not ended.is_set():
            turns += 1
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.05)
        return None

    ended = asyncio.Event()
    watcher = asyncio.create_task(stubborn(ended))
    await asyncio.sleep(0.12)
    began = time.monotonic()
    await _stop_heartbeat(watcher, ended)
    assert watcher.done() and watcher.result() is None
    assert time.monotonic() - began < 1.0
    stopped_at = turns
    await asyncio.sleep(0.2)
    assert turns == stopped_at  # no lease kept alive behind the request's back


async def test_a_heartbeat_parked_between_beats_is_not_waited_for() -> None:
    calls = 0
    ended = asyncio.Event()

    async def parked() -> _Cancelled | None:
        nonlocal calls
        while not ended.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await asyncio.Event().wait()
            if ended.is_set():
                break
            calls += 1  # a beat: never once the request ended
        return None

    watcher = asyncio.create_task(parked())
    await asyncio.sleep(0.01)
    await _stop_heartbeat(watcher, ended, beating=False)
    assert not watcher.done()  # returned at once: nothing to wait for
    await asyncio.sleep(0)
    assert watcher.done() and watcher.cancelled()
    assert calls == 0
