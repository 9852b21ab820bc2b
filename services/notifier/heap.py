"""Keep the cyclic garbage collector off the long-lived objects of open streams.

Each open Watch stream holds about sixty objects the collector tracks (most of them gRPC's:
the call's state, its tasks and coroutines), so 10,000 watchers make a heap of 600,000.
CPython's full collection walks all of them, about 0.2-0.4 s during which no update goes
out, and it runs whenever the heap has grown by a quarter: many times while watchers
arrive, and again whenever a burst leaves survivors. A finished stream is freed by
reference counting alone (it leaves no cycles), so there is little for those walks to find.

So every few seconds the young generations are collected (cheap: only recent objects)
and what survives is frozen (``gc.freeze``): moved where collections do not look. Young
garbage is still collected as usual, and frozen objects are still freed by reference
counting. Only cycles that form among frozen objects would stay: so once the frozen heap
has doubled since the last sweep (at most every ten minutes), or after an hour in any case,
everything is unfrozen and collected once, then frozen again.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time

from usher.logs import get_logger

__all__ = ["HeapFreezer"]

log = get_logger(__name__)

SWEEP_CHECK_SECONDS = 30.0


class HeapFreezer:
    def __init__(
        self,
        freeze_seconds: float = 2.0,
        min_sweep_seconds: float = 600.0,
        max_sweep_seconds: float = 3600.0,
        growth: float = 2.0,
        min_baseline: int = 50_000,
    ) -> None:
        self.freeze_seconds = freeze_seconds
        self.min_sweep_seconds = min_sweep_seconds
        self.max_sweep_seconds = max_sweep_seconds
        self.growth = growth
        self.min_baseline = min_baseline
        self.sweeps = 0
        #: Frozen objects right after the last sweep (the heap a sweep found alive).
        self._baseline = 0
        self._last_sweep = time.monotonic()

    def freeze(self) -> None:
        """Collect the young generations, then freeze the survivors."""
        gc.collect(1)
        gc.freeze()

    def sweep_due(self, now: float | None = None) -> bool:
        since = (time.monotonic() if now is None else now) - self._last_sweep
        if since >= self.max_sweep_seconds:
            return True
        grown = gc.get_freeze_count() >= self.growth * max(self._baseline, self.min_baseline)
        return grown and since >= self.min_sweep_seconds

    def sweep(self) -> int:
        """One full collection over everything, then freeze again. Returns what it freed."""
        started = time.perf_counter()
        gc.unfreeze()
        freed = gc.collect()
        gc.freeze()
        self.sweeps += 1
        self._baseline = gc.get_freeze_count()
        self._last_sweep = time.monotonic()
        log.info(
            "heap swept",
            freed=freed,
            frozen=self._baseline,
            took_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return freed

    async def run(self, stop: asyncio.Event) -> None:
        if self.freeze_seconds <= 0:
            return
        self._last_sweep = last_check = time.monotonic()
        try:
            while not stop.is_set():
                self.freeze()
                # Counting the frozen walks them all: only now and then.
                if time.monotonic() - last_check >= SWEEP_CHECK_SECONDS:
                    last_check = time.monotonic()
                    if self.sweep_due():
                        self.sweep()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.freeze_seconds)
        finally:
            gc.unfreeze()
