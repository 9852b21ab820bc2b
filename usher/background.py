"""Fire-and-forget work that must still be held and its failures seen."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from usher.logs import get_logger

__all__ = ["Background"]

log = get_logger(__name__)


class Background:
    """Runs coroutines nobody waits for (bookkeeping off a caller's critical path), or holds
    work already under way (``hold``). Holds each until it ends (the event loop keeps only
    weak references to tasks), logs failures, and lets a stop wait for them (``drain``)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[Any]] = set()

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        self.hold(asyncio.create_task(work))

    def hold(self, pending: asyncio.Future[Any]) -> None:
        self._tasks.add(pending)
        pending.add_done_callback(self._done)

    def _done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.warning("background work failed", error=str(error))

    async def drain(self) -> None:
        """Wait for everything held now to end (failures logged, not raised)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def __len__(self) -> int:
        return len(self._tasks)
