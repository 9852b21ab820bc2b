"""Fire-and-forget work that must still be held and its failures seen."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from usher.logs import get_logger

__all__ = ["Background"]

log = get_logger(__name__)


class Background:
    """Runs coroutines nobody waits for (bookkeeping off a caller's critical path). Holds each
    task until it ends (the event loop keeps only weak references) and logs failures."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.warning("background work failed", error=str(error))

    def __len__(self) -> int:
        return len(self._tasks)
