"""One reader of the model event streams per Notifier replica, fanning events out in memory.

Every state change and token batch is appended by the scheduler's scripts to the request's
own stream (for replay) and to its model's stream with the request stream's entry id as
'eid' (for live delivery). A replica reads all model streams with one blocking XREAD and
hands each event to the local watchers of that request, so 10,000 watchers cost one Redis
reader, not 10,000. Positions are not events: when a model's queue changes, the positions
of its queued watchers are recomputed (at most every ``position_interval`` seconds) from one
read of the queue and pushed when they moved. Replicas share nothing but Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

import redis.asyncio as aioredis

from usher import keys, metrics
from usher.keys import ModelKeys
from usher.logs import get_logger

__all__ = ["Event", "Fanout", "PositionChange", "Subscriber", "stream_id_key"]

log = get_logger(__name__)

#: Event types that change who is in a model's queue (and so everyone's position).
QUEUE_CHANGES = frozenset(
    {"queued", "running", "cancelled", "expired", "requeued", "fallback", "completed", "failed"}
)
#: Beyond this many queued, positions are read one by one instead of reading the whole queue.
FULL_READ_LIMIT = 50_000
SUBSCRIBER_BUFFER = 10_000


def stream_id_key(entry_id: str) -> tuple[int, int]:
    """Redis stream ids "ms-seq" in order."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of a model stream."""

    model: str
    fields: dict[str, str]

    @property
    def type(self) -> str:
        return self.fields.get("type", "")

    @property
    def eid(self) -> str:
        return self.fields.get("eid", "")


@dataclass(slots=True)
class PositionChange:
    """The latest place of a queued request; updated in place while not yet sent."""

    position: int
    queue_length: int


@dataclass(eq=False)
class Subscriber:
    request_id: str
    model: str
    queue: asyncio.Queue[Event | PositionChange] = field(
        default_factory=lambda: asyncio.Queue(SUBSCRIBER_BUFFER)
    )
    #: Set when events were dropped because the watcher fell behind: it must replay.
    lagged: bool = False
    #: Last position pushed (0: not queued / unknown).
    position: tuple[int, int] = (0, 0)
    wants_positions: bool = True

    #: A position change waiting in the queue, to update rather than queue another.
    unsent_position: PositionChange | None = None

    def offer(self, item: Event | PositionChange) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.lagged = True

    def offer_position(self, position: int, queue_length: int) -> None:
        """Only the newest place matters: a slow watcher gets one update, not a backlog."""
        if self.unsent_position is not None:
            self.unsent_position.position = position
            self.unsent_position.queue_length = queue_length
            return
        self.unsent_position = PositionChange(position, queue_length)
        self.offer(self.unsent_position)


class Fanout:
    def __init__(self, client: aioredis.Redis, position_interval: float = 0.2) -> None:
        self.redis = client
        self.position_interval = position_interval
        self._by_request: dict[str, set[Subscriber]] = defaultdict(set)
        self._by_model: dict[str, set[Subscriber]] = defaultdict(set)
        self._dirty: set[str] = set()
        self._last_ids: dict[str, str] = {}
        self._changed = asyncio.Event()
        self._started = False
        self.delivered = 0

    # ---- subscriptions ----------------------------------------------------------------------

    def subscribe(self, request_id: str, model: str) -> Subscriber:
        subscriber = Subscriber(request_id, model)
        self._by_request[request_id].add(subscriber)
        self._by_model[model].add(subscriber)
        self._dirty.add(model)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        for index, key in (
            (self._by_request, subscriber.request_id),
            (self._by_model, subscriber.model),
        ):
            group = index.get(key)
            if group is not None:
                group.discard(subscriber)
                if not group:
                    del index[key]

    @property
    def watchers(self) -> int:
        return sum(len(s) for s in self._by_request.values())

    # ---- reading ------------------------------------------------------------------------------

    async def _models(self) -> list[str]:
        return sorted(m.decode() for m in cast(set[bytes], await self.redis.smembers(keys.MODELS)))

    async def _start_positions(self, models: Iterable[str]) -> None:
        """Models known at start are read from their current end (watchers get history by
        replay); a model that appears later is read from its beginning, so the events
        written before this replica noticed it still reach its watchers."""
        first_scan = not self._started
        self._started = True
        for model in models:
            if model in self._last_ids:
                continue
            if not first_scan:
                self._last_ids[model] = "0-0"
                continue
            stream = ModelKeys(model).events
            last = cast(
                list[tuple[bytes, dict[bytes, bytes]]], await self.redis.xrevrange(stream, count=1)
            )
            self._last_ids[model] = last[0][0].decode() if last else "0-0"

    async def prime(self) -> None:
        """Note where every model's stream ends now. Called before the server takes Watch
        calls, so nothing a watcher's snapshot did not include can fall before the reader."""
        await self._start_positions(await self._models())

    async def read_once(self, block_ms: int = 1000) -> int:
        models = await self._models()
        await self._start_positions(models)
        if not models:
            await asyncio.sleep(block_ms / 1000)
            return 0
        streams = {ModelKeys(m).events: self._last_ids[m] for m in models}
        by_stream = {ModelKeys(m).events: m for m in models}
        reply = cast(
            list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None,
            await self.redis.xread(streams, count=2000, block=block_ms),  # type: ignore[arg-type]
        )
        count = 0
        for stream, entries in reply or []:
            model = by_stream[stream.decode()]
            for entry_id, raw in entries:
                self._last_ids[model] = entry_id.decode()
                self.dispatch(Event(model, {k.decode(): v.decode() for k, v in raw.items()}))
                count += 1
        return count

    def dispatch(self, event: Event) -> None:
        stamp = event.fields.get("ts")
        if stamp:
            metrics.FANOUT_LAG.observe(max(0.0, time.time() - int(stamp) / 1000))
        for subscriber in self._by_request.get(event.fields.get("id", ""), ()):
            subscriber.offer(event)
            self.delivered += 1
        if event.type in QUEUE_CHANGES:
            self._dirty.add(event.model)
            self._changed.set()

    async def push_positions(self) -> None:
        """Recompute positions of queued watchers in models whose queue changed."""
        dirty, self._dirty = self._dirty, set()
        for model in dirty:
            watchers = [s for s in self._by_model.get(model, ()) if s.wants_positions]
            if not watchers:
                continue
            ranks = await self._ranks(model, {s.request_id for s in watchers})
            length = ranks.pop("", 0)
            for subscriber in watchers:
                position = ranks.get(subscriber.request_id, 0)
                current = (position, length if position else 0)
                if current != subscriber.position:
                    subscriber.position = current
                    if position:
                        subscriber.offer_position(position, length)

    async def _ranks(self, model: str, request_ids: set[str]) -> dict[str, int]:
        """1-based positions of the given requests ("" → queue length)."""
        mk = ModelKeys(model)
        length = int(await self.redis.zcard(mk.queue))
        if length <= FULL_READ_LIMIT or len(request_ids) * 20 > length:
            queue = cast(list[bytes], await self.redis.zrange(mk.queue, 0, -1))
            ranks = {
                m[17:].decode(): i + 1
                for i, m in enumerate(queue)
                if m[17:].decode() in request_ids
            }
        else:
            ordered = sorted(request_ids)
            async with self.redis.pipeline(transaction=False) as pipe:
                for request_id in ordered:
                    pipe.hget(mk.request(request_id), "member")
                members = cast(list[bytes | None], await pipe.execute())
            async with self.redis.pipeline(transaction=False) as pipe:
                for member in members:
                    pipe.zrank(mk.queue, member or b"-")
                found = cast(list[int | None], await pipe.execute())
            ranks = {
                r: rank + 1 for r, rank in zip(ordered, found, strict=True) if rank is not None
            }
        ranks[""] = length
        return ranks

    async def run(self, stop: asyncio.Event) -> None:
        reader = asyncio.create_task(self._read_forever(stop))
        positions = asyncio.create_task(self._positions_forever(stop))
        await asyncio.gather(reader, positions)

    async def _read_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.read_once(block_ms=500)
            except Exception as exc:  # Redis away: resume from the last id read.
                log.warning("event read failed", error=str(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)

    async def _positions_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                if self._dirty:
                    await self.push_positions()
            except Exception as exc:
                log.warning("position update failed", error=str(exc))
            self._changed.clear()
            remaining = self.position_interval - (time.monotonic() - started)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(remaining, 0.01))
