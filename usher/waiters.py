"""Coroutines parked until something wakes them, oldest first, one at a time.

An ``asyncio.Condition`` wakes every waiter on ``notify_all`` (each then redoes its work
to find it was not needed) or an arbitrary one on ``notify``; here each parked coroutine
carries what it waits for, and a waker picks the oldest that wants what it has."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Waiters"]

T = TypeVar("T")


class Waiters(Generic[T]):
    def __init__(self) -> None:
        self._parked: collections.deque[tuple[T, asyncio.Future[None]]] = collections.deque()

    def __len__(self) -> int:
        return len(self._parked)

    async def wait(self, wants: T, timeout: float) -> None:
        """Park until woken or ``timeout`` seconds have passed (a plain timer resolves the
        future: asyncio.wait_for costs several times more, and loops park often)."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        entry = (wants, waiter)
        self._parked.append(entry)
        timer = loop.call_later(timeout, _resolve, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            with contextlib.suppress(ValueError):
                self._parked.remove(entry)

    def wake_first(self, wanted: Callable[[T], bool] = lambda _: True) -> bool:
        """Wake the oldest parked coroutine whose wants ``wanted`` accepts; False if none."""
        for entry in self._parked:
            if wanted(entry[0]) and not entry[1].done():
                self._parked.remove(entry)
                entry[1].set_result(None)
                return True
        return False

    def waiting(self, wanted: Callable[[T], bool]) -> bool:
        """Whether a parked coroutine's wants ``wanted`` accepts."""
        return any(wanted(wants) and not waiter.done() for wants, waiter in self._parked)

    def wake_all(self, wanted: Callable[[T], bool] | None = None) -> None:
        """Wake every parked coroutine (whose wants ``wanted`` accepts, when given)."""
        kept: collections.deque[tuple[T, asyncio.Future[None]]] = collections.deque()
        while self._parked:
            entry = self._parked.popleft()
            if wanted is not None and not wanted(entry[0]):
                kept.append(entry)
            elif not entry[1].done():
                entry[1].set_result(None)
        self._parked = kept


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
