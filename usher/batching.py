"""Calls coalesced into round trips: those made while a batch is under way go together in
the next one (up to a limit), so concurrent requests share Redis round trips instead of
paying one each, and a lone call waits for nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["Coalescer"]

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    """``submit(item)`` queues an item and returns the future of its reply; one task at a
    time runs ``run`` on the items queued so far (at most ``limit``). ``run`` answers each
    item in order, an exception in place of an item that failed; an exception it raises
    reaches every caller of that batch. An item whose caller went away before it was sent
    is dropped when ``droppable`` says so; one answered after its caller went away is
    handed to ``orphaned`` (to undo what it took). With ``linger`` (seconds), a batch
    started when none was under way waits that long first, for the calls that follow
    (worth it only where no caller waits on the reply)."""

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
        limit: int,
        *,
        droppable: Callable[[T], bool] = lambda _: False,
        orphaned: Callable[[T, R], None] | None = None,
        linger: float = 0.0,
    ) -> None:
        self._run = run
        self._linger = linger
        self._limit = limit
        self._droppable = droppable
        self._orphaned = orphaned
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._writing: asyncio.Task[None] | None = None

    @property
    def busy(self) -> bool:
        """A batch is under way (a call made now waits for the next)."""
        return self._writing is not None

    def submit(self, item: T) -> asyncio.Future[R]:
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[R] = loop.create_future()
        self._pending.append((item, reply))
        if self._writing is None:
            self._writing = loop.create_task(self._write_pending())
        return reply

    async def _write_pending(self) -> None:
        try:
            if self._linger > 0:
                await asyncio.sleep(self._linger)
            while self._pending:
                batch = [
                    (item, reply)
                    for item, reply in self._pending[: self._limit]
                    if not (reply.cancelled() and self._droppable(item))
                ]
                del self._pending[: self._limit]
                if not batch:
                    continue
                try:
                    replies = await self._run([item for item, _ in batch])
                except asyncio.CancelledError:
                    for _, reply in batch + self._pending:
                        reply.cancel()
                    self._pending.clear()
                    raise
                except Exception as exc:  # each caller hears of it
                    for _, reply in batch:
                        if not reply.done():
                            reply.set_exception(exc)
                    continue
                for (item, reply), answer in zip(batch, replies, strict=True):
                    self._settle(item, reply, answer)
        finally:
            self._writing = None

    def _settle(self, item: T, reply: asyncio.Future[R], answer: R | BaseException) -> None:
        if reply.done():
            if reply.cancelled() and self._orphaned and not isinstance(answer, BaseException):
                self._orphaned(item, answer)
            return
        if isinstance(answer, BaseException):
            reply.set_exception(answer)
        else:
            reply.set_result(answer)
