"""Queue badges for model pickers, computed once per replica and shared by every watcher.

Every ``interval`` seconds (and within it when a queue changes) the board reads each model's
queue length, running count, capacity and averages, builds the badges (updates.badge), adds
suggestions to long queues, and wakes the WatchQueues streams whose view changed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence

from services.notifier import updates
from usher.logs import get_logger
from usher.queue.reads import QueueReader
from usher.v1 import notifier_pb2

__all__ = ["BadgeBoard"]

log = get_logger(__name__)

#: Capacity of each model (slots the fleet offers), e.g. from the Pool; None = unknown.
CapacitySource = Callable[[Sequence[str]], Awaitable[dict[str, int]]]


class BadgeBoard:
    def __init__(
        self,
        queue: QueueReader,
        capacity: CapacitySource | None = None,
        external_alternative: str = "",
        interval: float = 1.0,
    ) -> None:
        self.queue = queue
        self._capacity = capacity
        self.external_alternative = external_alternative
        self.interval = interval
        self._badges: dict[str, notifier_pb2.QueueBadge] = {}
        self._subscribers: set[asyncio.Event] = set()
        #: Models someone asked for by name (with how many watchers), badged even before
        #: their first request: a picker shows every model it offers.
        self._named: Counter[str] = Counter()
        #: Some Pool sees a healthy external provider (usher.keys.POOL_EXTERNAL): requests
        #: may be offered the switch.
        self.external_available = False

    def subscribe(self, models: Sequence[str] = ()) -> asyncio.Event:
        event = asyncio.Event()
        self._subscribers.add(event)
        self._named.update(set(models))
        return event

    def unsubscribe(self, event: asyncio.Event, models: Sequence[str] = ()) -> None:
        self._subscribers.discard(event)
        self._named.subtract(set(models))
        self._named += Counter()  # drop the models nobody names any more

    def missing(self, models: Sequence[str]) -> list[str]:
        """Of ``models``, those without a badge yet."""
        return [m for m in models if m not in self._badges]

    def current(self, models: Sequence[str]) -> list[notifier_pb2.QueueBadge]:
        if not models:
            return [self._badges[m] for m in sorted(self._badges)]
        return [self._badges[m] for m in models if m in self._badges]

    async def refresh(self, extra_models: Sequence[str] = ()) -> None:
        models = sorted(set(await self.queue.models()) | set(extra_models) | set(self._named))
        capacity = await self._capacity(models) if self._capacity else {}
        counts, self.external_available = await self.queue.badge_counts(models)
        fresh: dict[str, notifier_pb2.QueueBadge] = {}
        for i, model in enumerate(models):
            averages, parallel = await self.queue.model_averages(model)
            config = await self.queue.config(model)
            fresh[model] = updates.badge(
                updates.BadgeInputs(
                    model=model,
                    queued=counts[i].queued,
                    running=counts[i].running,
                    capacity=capacity.get(model, parallel),
                    averages=averages,
                    max_queue_size=config.max_queue_size,
                    external_running=counts[i].external_running,
                )
            )
        for badge in fresh.values():
            if badge.level == notifier_pb2.QUEUE_LEVEL_LONG:
                model, sentence = updates.suggest(
                    badge.model, list(fresh.values()), self.external_alternative
                )
                badge.suggested_model, badge.suggestion = model, sentence
        changed = fresh != self._badges
        self._badges = fresh
        if changed:
            for event in self._subscribers:
                event.set()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.refresh()
            except Exception as exc:  # Redis or the pool away: keep the last badges.
                log.warning("badge refresh failed", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)
