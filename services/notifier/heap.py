"""Keep the cyclic garbage collector off the long-lived objects of open streams.

Each open Watch stream holds about sixty objects the collector tracks (most of them gRPC's:
the call's state, its tasks and coroutines), so 10,000 watchers make a heap of 600,000.
CPython's full collection walks all of them, about 0.2-0.4 s during which no update goes
out, and it runs whenever the heap has grown by a quarter: many times while watchers
arrive, and again whenever a burst leaves survivors. A finished stream is freed by
reference counting alone (it leaves no cycles), so there is little for those walks to find.

So every few seconds the young generations are collected (cheap: only recent objects)
and what survives is frozen (``gc.freeze``): moved where collections do not look. Young
garbage is still collected as usual. Rarely (``sweep_seconds``) everything is unfrozen
and collected once, so cycles among old objects cannot pile up forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time

from usher.logs import get_logger

__all__ = ["HeapFreezer"]

log = get_logger(__name__)


class HeapFreezer:
    def __init__(self, freeze_seconds: float = 2.0, sweep_seconds: float = 900.0) -> None:
        self.freeze_seconds = freeze_seconds
        self.sweep_seconds = sweep_seconds
        self.sweeps = 0

    def freeze(self) -> None:
        """Collect the young generations, then freeze the survivors."""
        gc.collect(1)
        gc.freeze()

    def sweep(self) -> int:
        """One full collection over everything, then freeze again. Returns what it freed."""
        started = time.perf_counter()
        gc.unfreeze()
        freed = gc.collect()
        gc.freeze()
        self.sweeps += 1
        log.info(
            "heap swept",
            freed=freed,
            frozen=gc.get_freeze_count(),
            took_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return freed

    async def run(self, stop: asyncio.Event) -> None:
        if self.freeze_seconds <= 0:
            return
        next_sweep = time.monotonic() + self.sweep_seconds
        try:
            while not stop.is_set():
                self.freeze()
                if self.sweep_seconds > 0 and time.monotonic() >= next_sweep:
                    self.sweep()
                    next_sweep = time.monotonic() + self.sweep_seconds
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.freeze_seconds)
        finally:
            gc.unfreeze()
