"""One reader of the model event streams per Notifier replica, fanning events out in memory.

Every state change and token batch is appended by the scheduler's scripts to the request's
own stream (for replay) and to its model's stream with the request stream's entry id as
'eid' (for live delivery). A replica reads all model streams with one blocking XREAD and
hands each event to the local watchers of that request, so 10,000 watchers cost one Redis
reader, not 10,000.

Work is done once per request, not once per watcher: for the state changes in one batch of
events the reader reads the changed requests in one pipelined round trip and hands every
watcher of a request the same ``Update`` (whose response is built once and shared), so a
burst of completions costs one Redis read per batch, not one per watcher.

Positions are not events: when a model's queue changes, the positions of its queued
requests are recomputed (at most every ``position_interval`` seconds, less often when the
read is costly) from one read of the queue. Those that moved wait in a coalescing FIFO and
go out at a bounded rate (``position_rate`` messages per second, in small slices), newest
place only, so a queue in constant motion cannot flood the event loop and delay the
updates that matter (a cancel, a completion) behind thousands of place changes.
Replicas share nothing but Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

from services.notifier import updates
from usher import metrics
from usher.ids import event_id_key
from usher.keys import ModelKeys
from usher.logs import get_logger
from usher.queue.eta import ModelAverages
from usher.queue.reads import QueueReader
from usher.queue.records import QUEUED, StoredRequest, WrittenEvents
from usher.v1 import notifier_pb2
from usher.waiters import Waiters

__all__ = [
    "AveragesCache",
    "Event",
    "Fanout",
    "PositionUpdate",
    "Subscriber",
    "Update",
]

log = get_logger(__name__)

#: Event types that change who is in a model's queue (and so everyone's position).
QUEUE_CHANGES = frozenset(
    {"queued", "running", "cancelled", "expired", "requeued", "fallback", "completed", "failed"}
)
#: The whole queue is read for positions when it is shorter than this many times the number
#: of queued requests watched here; otherwise each watched one's place is asked for alone.
FULL_READ_RATIO = 20
#: Items a watcher may fall behind before it is told to replay from Redis instead.
SUBSCRIBER_BUFFER = 1000
#: Position messages handed out between two pauses of the paced sender.
POSITION_SLICE = 64
#: A position round may take at most this share of the time between rounds of one model.
POSITION_ROUND_DUTY = 0.1
#: A watcher that has heard nothing for this long checks the request's stream itself.
IDLE_CHECK_SECONDS = 30.0
IDLE_CHECKS_PER_SECOND = 200
#: How long the list of models (and model averages) are reused before they are read again.
MODELS_TTL_SECONDS = 1.0
AVERAGES_TTL_SECONDS = 1.0
#: Script calls handed over in process that may wait per request for the reader to bring
#: what came before them; older ones are left to the reader.
MAX_HANDED = 16
#: Events a writer in the same process hands over (services/scheduler/store.py: finish),
#: and how long the reader waits for them before reading the record instead (a completion
#: written by another process waits that long once).
HANDED_TYPES = frozenset({"completed", "failed", "cancelled"})
HAND_OVER_WAIT_SECONDS = 0.002
#: Where completions are handed over (usher serve), a read that brought a few events is
#: followed by this pause before the next, while no watcher here follows a request live:
#: the blocking read wakes at every event written, and most are this process's own
#: queuings, claims and progress, which no answer sent whole waits for. Each wake costs a
#: round trip, a parse and a loop turn (three per request at one request at a time); the
#: pause lets them come a few to a read. A live watcher (a streamed answer, a browser)
#: waits for exactly those events, so none is paused for while one is here (others see
#: events written by other processes up to a pause later). A read that brought many has
#: batched already (a busy loop: a pause would cost it a turn).
HANDED_READ_PAUSE_SECONDS = 0.005
HANDED_READ_PAUSE_BELOW = 8
#: Request ids are ULIDs: the queue member ends with one.
_ID_LENGTH = 26


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


class Update:
    """One event of one request, as every local watcher of that request receives it.

    For a state change, ``snapshot`` is the request as read right after the event (None:
    it is gone), read once for all its watchers; ``read`` is False when that read failed
    and each watcher must read for itself. ``memo`` holds what watchers build from it
    (the view, the response), so the first builds it and the others reuse it."""

    __slots__ = ("averages", "eid", "fields", "key", "kind", "memo", "read", "snapshot")

    def __init__(
        self,
        fields: dict[str, str],
        snapshot: StoredRequest | None = None,
        read: bool = False,
        averages: tuple[ModelAverages, int] | None = None,
    ) -> None:
        self.fields = fields
        self.eid = fields.get("eid", "")
        self.key = event_id_key(self.eid) or (0, 0)
        self.kind = updates.EVENT_KINDS.get(
            fields.get("type", ""), notifier_pb2.UPDATE_KIND_UNSPECIFIED
        )
        self.snapshot = snapshot
        self.read = read
        self.averages = averages
        self.memo: dict[Any, Any] = {}


class PositionUpdate:
    """A queued request's new place, shared by all its watchers (``memo`` as in Update)."""

    __slots__ = ("averages", "memo", "position", "queue_length", "stored")

    def __init__(
        self,
        position: int,
        queue_length: int,
        stored: StoredRequest,
        averages: tuple[ModelAverages, int],
    ) -> None:
        self.position = position
        self.queue_length = queue_length
        self.stored = stored
        self.averages = averages
        self.memo: dict[Any, Any] = {}


class _PositionMark:
    """Stands in a watcher's mailbox for its newest position (kept aside, replaced in place)."""

    __slots__ = ()


_POSITION = _PositionMark()


class Subscriber:
    """One Watch stream's mailbox: updates in order, the newest position coalesced."""

    __slots__ = (
        "_items",
        "_position",
        "_waiter",
        "covered",
        "group",
        "heard",
        "lagged",
        "live",
        "model",
        "request_id",
        "told",
    )

    def __init__(self, group: Watched, live: bool = True) -> None:
        self.group = group
        #: Whether it waits for every update (a Watch), not only the last (final_only).
        self.live = live
        self.request_id = group.request_id
        self.model = group.model
        # A list, not a deque: it is nearly always empty or holds one or two items, and an
        # empty deque costs ~600 bytes per watcher.
        self._items: list[Update | _PositionMark] = []
        self._waiter: asyncio.Future[None] | None = None
        self._position: PositionUpdate | None = None
        #: Set when updates were dropped because the watcher fell behind (or it has been
        #: quiet for a long while): it must replay from its last event id.
        self.lagged = False
        #: (position, queue length) last handed to this watcher; (0, 0): none / unknown.
        self.told: tuple[int, int] = (0, 0)
        self.heard = time.monotonic()
        #: Every event of the request up to this id (as a key) is with this watcher or on
        #: its way (its watch's read, its mailbox, or the replay a lag forces): a later
        #: copy of one is not offered again.
        self.covered: tuple[int, int] = (0, 0)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def offer(self, item: Update) -> None:
        self.heard = time.monotonic()
        if item.key > self.covered:
            self.covered = item.key
        if self.lagged:
            return  # it replays from Redis anyway
        if len(self._items) >= SUBSCRIBER_BUFFER:
            self.lagged = True
            self._items.clear()
            self._position = None
        else:
            self._items.append(item)
        self._wake()

    def offer_position(self, update: PositionUpdate) -> None:
        """Only the newest place matters: a slow watcher gets one update, not a backlog."""
        self.heard = time.monotonic()
        if self._position is None:
            self._items.append(_POSITION)
        self._position = update
        self._wake()

    def mark_lagged(self) -> None:
        self.lagged = True
        self._items.clear()
        self._position = None
        self._wake()

    async def get(self) -> Update | PositionUpdate | None:
        """The next item; None when the watcher must replay from Redis (lagged)."""
        while not self._items and not self.lagged:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.lagged:
            self.lagged = False
            return None
        item = self._items.pop(0)
        if isinstance(item, _PositionMark):
            position, self._position = self._position, None
            return position
        return item

    @property
    def pending(self) -> int:
        return len(self._items)


class Watched:
    """A request with local watchers: what the reader and the position rounds know of it."""

    __slots__ = (
        "at",
        "handed",
        "member",
        "model",
        "position",
        "queued",
        "request_id",
        "stored",
        "subscribers",
    )

    def __init__(self, request_id: str, model: str) -> None:
        self.request_id = request_id
        self.model = model
        #: The request as last known (prompt left out); None until its first watcher's read.
        self.stored: StoredRequest | None = None
        #: The id (as a key) of the request's event ``stored`` reflects, at least.
        self.at: tuple[int, int] = (0, 0)
        #: Events handed over in process that wait for the reader to deliver those before.
        self.handed: list[WrittenEvents] = []
        self.queued = False
        #: Its member in the queue's sorted set (fixed at enqueue), once read.
        self.member: bytes | None = None
        #: Last place computed; None forces the next round to consider it.
        self.position: tuple[int, int] | None = None
        self.subscribers: list[Subscriber] = []


class AveragesCache:
    """Model averages for ETAs, read at most once a second per model by one caller while
    the others keep using the previous value (no herd of watchers reading the same hash)."""

    def __init__(self, queue: QueueReader, ttl: float = AVERAGES_TTL_SECONDS) -> None:
        self.queue = queue
        self.ttl = ttl
        self._values: dict[str, tuple[float, tuple[ModelAverages, int]]] = {}
        self._loading: dict[str, asyncio.Future[tuple[ModelAverages, int]]] = {}

    def cached(self, model: str) -> tuple[ModelAverages, int]:
        """The last value read (defaults before the first read); never waits."""
        entry = self._values.get(model)
        if entry is not None:
            return entry[1]
        return self.queue.cached_averages(model), self.queue.defaults.parallel

    async def get(self, model: str) -> tuple[ModelAverages, int]:
        """Fresh enough averages: the cached value while a refresh runs in the background;
        only the very first read of a model waits."""
        entry = self._values.get(model)
        if entry is not None and entry[0] > time.monotonic():
            return entry[1]
        loading = self._refresh(model)
        if entry is not None:
            return entry[1]
        return await asyncio.shield(loading)

    def peek(self, model: str) -> tuple[ModelAverages, int]:
        """The cached value (defaults before the first read), never waiting: for a request
        that is not queued, whose ETA does not count places. A stale value is refreshed in
        the background, for later callers."""
        entry = self._values.get(model)
        if entry is None or entry[0] <= time.monotonic():
            self._refresh(model)
        return self.cached(model)

    def _refresh(self, model: str) -> asyncio.Future[tuple[ModelAverages, int]]:
        loading = self._loading.get(model)
        if loading is None:
            loading = asyncio.ensure_future(self._load(model))
            loading.add_done_callback(_retrieve)  # a failed refresh nobody awaited: no warning
            self._loading[model] = loading
        return loading

    async def _load(self, model: str) -> tuple[ModelAverages, int]:
        try:
            value = await self.queue.model_averages(model)
            self._values[model] = (time.monotonic() + self.ttl, value)
            return value
        finally:
            self._loading.pop(model, None)


def _wanted_by(group: Watched, key: tuple[int, int]) -> bool:
    """Whether some watcher of the request does not have its event ``key`` yet."""
    return any(subscriber.covered < key for subscriber in group.subscribers)


def _handed(group: Watched, event_id: str) -> bool:
    """Whether the event was handed over in process and waits for those before it."""
    return any(event_id == eid for written in group.handed for eid, _ in written.events)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class Fanout:
    def __init__(
        self,
        queue: QueueReader,
        position_interval: float = 0.2,
        position_rate: float = 2000.0,
    ) -> None:
        self.queue = queue
        self.position_interval = position_interval
        #: Position messages per second, at most (all watchers together).
        self.position_rate = max(1.0, position_rate)
        self.averages = AveragesCache(queue)
        self._groups: dict[str, Watched] = {}
        self._by_model: dict[str, dict[str, Watched]] = {}
        self._subscribers: set[Subscriber] = set()
        #: Subscribers waiting for every update (not only the last): while there is one,
        #: the reader reads on at once (HANDED_READ_PAUSE_SECONDS).
        self._live = 0
        #: The reader's pause between reads; a live watcher's arrival ends it.
        self._pause: Waiters[None] = Waiters()
        self._dirty: set[str] = set()
        self._next_round: dict[str, float] = {}
        #: Requests whose place changed and whose watchers have not been told yet, oldest
        #: first; a newer place replaces the value and keeps the turn.
        self._pending: dict[Watched, tuple[int, int]] = {}
        self._has_pending = asyncio.Event()
        self._last_ids: dict[str, str] = {}
        self._models_cache: tuple[float, list[str]] = (0.0, [])
        self._started = False
        #: Set once a writer in this process hands events over (usher serve).
        self._hands_over = False
        #: Set when a writer hands events over, for the reader waiting for them.
        self._handed_signal: asyncio.Future[None] | None = None
        self.delivered = 0
        self.positions_sent = 0

    # ---- subscriptions ----------------------------------------------------------------------

    def subscribe(self, stored: StoredRequest, tip: str = "0-0", live: bool = True) -> Subscriber:
        """``join`` and ``opened`` at once, for a request already read."""
        subscriber = self.join(stored.id, stored.model, live)
        self.opened(subscriber, stored, tip)
        return subscriber

    def join(self, request_id: str, model: str, live: bool = True) -> Subscriber:
        """A new watcher of a request, before its record is read (so no event can fall
        between the read and the subscription); ``opened`` completes it. ``live``: it waits
        for every update, not only the last."""
        group = self._groups.get(request_id)
        if group is None:
            group = self._groups[request_id] = Watched(request_id, model)
            self._by_model.setdefault(model, {})[request_id] = group
            if model not in self._last_ids:
                self._models_cache = (0.0, [])  # a model the reader does not know yet
        subscriber = Subscriber(group, live)
        group.subscribers.append(subscriber)
        self._subscribers.add(subscriber)
        if live:
            self._live += 1
            self._pause.wake_all()  # its request's next event may be on its way already
        return subscriber

    def opened(self, subscriber: Subscriber, stored: StoredRequest, tip: str = "0-0") -> None:
        """The watcher's request as its watch read it (prompt and owners left out), as of
        its event ``tip``."""
        group = subscriber.group
        at = event_id_key(tip) or (0, 0)
        subscriber.covered = max(subscriber.covered, at)
        if group.stored is None or at > group.at:
            group.stored, group.at = stored, at
            group.queued = stored.state == QUEUED
        if stored.state == QUEUED:
            subscriber.told = (stored.position, stored.queue_length)
        if group.queued:
            group.position = None
            self._dirty.add(group.model)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber in self._subscribers:
            self._subscribers.discard(subscriber)
            self._live -= subscriber.live
        group = subscriber.group
        with contextlib.suppress(ValueError):
            group.subscribers.remove(subscriber)
        if not group.subscribers and self._groups.get(group.request_id) is group:
            del self._groups[group.request_id]
            self._pending.pop(group, None)
            by_model = self._by_model.get(group.model)
            if by_model is not None:
                by_model.pop(group.request_id, None)
                if not by_model:
                    del self._by_model[group.model]

    @property
    def watchers(self) -> int:
        return len(self._subscribers)

    # ---- reading ------------------------------------------------------------------------------

    async def _models(self) -> list[str]:
        fetched_at, models = self._models_cache
        now = time.monotonic()
        if now - fetched_at < MODELS_TTL_SECONDS:
            return models
        models = await self.queue.models()
        self._models_cache = (now, models)
        return models

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
            self._last_ids[model] = await self.queue.events_end(model)

    async def prime(self) -> None:
        """Note where every model's stream ends now. Called before the server takes Watch
        calls, so nothing a watcher's snapshot did not include can fall before the reader."""
        self._models_cache = (0.0, [])
        await self._start_positions(await self._models())

    async def read_once(self, block_ms: int = 1000) -> int:
        models = await self._models()
        await self._start_positions(models)
        if not models:
            await asyncio.sleep(block_ms / 1000)
            return 0
        streams = {ModelKeys(m).events: self._last_ids[m] for m in models}
        by_stream = {ModelKeys(m).events: m for m in models}
        events: list[Event] = []
        for stream, entries in await self.queue.read_streams(streams, block_ms):
            model = by_stream[stream.decode()]
            for entry_id, raw in entries:
                self._last_ids[model] = entry_id.decode()
                events.append(Event(model, {k.decode(): v.decode() for k, v in raw.items()}))
        if events:
            await self.dispatch_batch(events)
        return len(events)

    async def dispatch_batch(self, events: list[Event]) -> None:
        """Hand a batch of events out. A state change of a request with watchers here
        shows the request as that event left it: worked out from the event when it says
        all it changed (``updates.after_event``), else from one pipelined read of those
        requests for the whole batch."""
        wanted, known = self._plan(events)
        if self._hands_over and any(events[i].type in HANDED_TYPES for i in wanted.values()):
            # usher serve: Redis answers this reader before the script that wrote the
            # events, whose writer hands them over a moment later. Wait that moment (at
            # most HAND_OVER_WAIT_SECONDS) rather than read what it brings.
            deadline = time.monotonic() + HAND_OVER_WAIT_SECONDS
            while (remaining := deadline - time.monotonic()) > 0:
                signal = self._handed_signal = asyncio.get_running_loop().create_future()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(signal, remaining)
                wanted, known = self._plan(events)
                if not any(events[i].type in HANDED_TYPES for i in wanted.values()):
                    break
            self._handed_signal = None
        by_id = {request_id: events[i].model for request_id, i in wanted.items()}
        snapshots: dict[str, StoredRequest | None] = {}
        read = False
        if by_id:
            try:
                snapshots = await self.read_requests(by_id)
                read = True
            except Exception as exc:  # each watcher reads for itself instead
                log.warning("request read failed", error=str(exc))
            for model in set(by_id.values()):
                with contextlib.suppress(Exception):
                    await self.averages.get(model)
        for model in {events[index].model for index in known}:
            self.averages.peek(model)  # a running request's ETA: cached, kept fresh
        for index, event in enumerate(events):
            request_id = event.fields.get("id", "")
            if index in known:
                self.dispatch(event, known[index], True)
            elif request_id in snapshots:
                self.dispatch(event, snapshots[request_id], read)
            else:
                self.dispatch(event, None, read and request_id in wanted)

    def _plan(self, events: list[Event]) -> tuple[dict[str, int], dict[int, StoredRequest]]:
        """Which requests of a batch must be read (id → index of its first event that
        needs it) and, for the other state changes of watched requests, the request as
        each left it (event's index → request), from what the events say."""
        wanted: dict[str, int] = {}
        known: dict[int, StoredRequest] = {}
        latest: dict[str, StoredRequest] = {}
        for index, event in enumerate(events):
            request_id = event.fields.get("id", "")
            group = self._groups.get(request_id)
            if group is None or event.type == "tokens" or request_id in wanted:
                continue
            key = event_id_key(event.eid)
            if key is not None and (not _wanted_by(group, key) or _handed(group, event.eid)):
                continue  # handed over in process (or about to be, once those before are)
            before = latest.get(request_id) or group.stored
            if before is not None and key is not None and key <= group.at:
                known[index] = before  # it knows a later state already: shown as that
                continue
            after = None if before is None else updates.after_event(before, event.fields)
            if after is None:
                wanted[request_id] = index
            else:
                known[index] = latest[request_id] = after
        return wanted, known

    async def read_requests(self, wanted: dict[str, str]) -> dict[str, StoredRequest | None]:
        """The current records of the given requests (id → model), with their places,
        prompts left out; None for one that is gone. Their queue members are kept."""
        found, members = await self.queue.watched_requests(wanted)
        for request_id, member in members.items():
            group = self._groups.get(request_id)
            if group is not None:
                group.member = member
        return found

    def dispatch(
        self, event: Event, snapshot: StoredRequest | None = None, read: bool = False
    ) -> None:
        stamp = event.fields.get("ts")
        if stamp:
            metrics.FANOUT_LAG.observe(max(0.0, time.time() - int(stamp) / 1000))
        group = self._groups.get(event.fields.get("id", ""))
        if group is not None:
            key = event_id_key(event.eid)
            if key is None or _wanted_by(group, key):
                update = Update(event.fields, snapshot, read, self.averages.cached(event.model))
                self._deliver(group, update)
            if group.handed:
                self._flush_handed(group)
        if event.type in QUEUE_CHANGES:
            self._dirty.add(event.model)

    def _deliver(self, group: Watched, update: Update) -> None:
        """One event to each watcher of its request that does not have it yet."""
        snapshot = update.snapshot
        if snapshot is not None:
            if update.key >= group.at:
                group.stored = snapshot
                group.at = update.key
            group.queued = group.stored is not None and group.stored.state == QUEUED
        elif update.kind == notifier_pb2.UPDATE_KIND_PROGRESS:
            group.at = max(group.at, update.key)  # output changes nothing in the record
        else:
            # A change not read (Redis away): what the group knew of the request is void
            # until the next read (events handed over wait for the reader meanwhile).
            group.stored = None
            if update.fields.get("state"):
                group.queued = update.fields["state"] == str(QUEUED)
        if not group.queued:
            self._pending.pop(group, None)
        key = update.key
        for subscriber in group.subscribers:
            if not update.eid or subscriber.covered < key:
                subscriber.offer(update)
                self.delivered += 1

    # ---- events handed over in process --------------------------------------------------------

    def hand_over(self, written: WrittenEvents) -> None:
        """Events a script of this process just wrote (``usher serve``): to the request's
        watchers now, without waiting for the reader or reading the record, provided each
        watcher has every event before them; the reader still reads the stream and brings
        them to any watcher that did not get them here (never one twice: ``covered``)."""
        try:
            self._take_over(written)
        except Exception as exc:  # never the writer's failure: the reader brings them
            log.warning("events handed over were left to the reader", error=str(exc))

    def _take_over(self, written: WrittenEvents) -> None:
        self._hands_over = True
        signal = self._handed_signal
        if signal is not None and not signal.done():
            signal.set_result(None)
        group = self._groups.get(written.request_id)
        if group is None or not written.events:
            return
        group.handed.append(written)
        if len(group.handed) > MAX_HANDED:
            del group.handed[0]  # the reader brings those
        self._flush_handed(group)

    def _flush_handed(self, group: Watched) -> None:
        while group.handed:
            written = group.handed[0]
            last = event_id_key(written.events[-1][0]) or (0, 0)
            if last <= group.at:
                group.handed.pop(0)  # the reader brought them first
                continue
            if group.stored is None or group.at < (event_id_key(written.after) or (0, 0)):
                return  # what came before them is still on its way through the reader
            group.handed.pop(0)
            self._deliver_handed(group, written)

    def _deliver_handed(self, group: Watched, written: WrittenEvents) -> None:
        averages = self.averages.cached(written.model)
        for event_id, fields in written.events:
            key = event_id_key(event_id)
            before = group.stored
            if key is None or key <= group.at or before is None:
                continue
            snapshot: StoredRequest | None = None
            if fields.get("type") != "tokens":
                snapshot = updates.after_event(before, fields) or updates.ended_by(
                    before, fields, written.result, written.usage
                )
                if snapshot is None:
                    return  # one it cannot show without a read: the reader brings the rest
            update = Update(fields, snapshot, snapshot is not None, averages)
            # A watcher gets it only if it has every event before it: else the reader's copy.
            previous = group.at
            for subscriber in group.subscribers:
                if subscriber.covered >= previous and subscriber.covered < key:
                    subscriber.offer(update)
                    self.delivered += 1
            if snapshot is not None:
                group.stored = snapshot
                group.queued = snapshot.state == QUEUED
                if not group.queued:
                    self._pending.pop(group, None)
            group.at = key

    # ---- positions ----------------------------------------------------------------------------

    async def push_positions(self) -> None:
        """One round: recompute the places of queued requests in models whose queue changed
        (and whose turn has come), and queue the moved ones for the paced sender."""
        now = time.monotonic()
        for model in list(self._dirty):
            if self._next_round.get(model, 0.0) > now:
                continue
            self._dirty.discard(model)
            groups = [g for g in self._by_model.get(model, {}).values() if g.queued]
            if not groups:
                continue
            started = time.perf_counter()
            ranks, length = await self._ranks(model, groups)
            for group in groups:
                position = ranks.get(group.request_id, 0)
                current = (position, length if position else 0)
                if current == group.position:
                    continue
                group.position = current
                if position:
                    self._pending[group] = current
                else:  # it left the queue: its event says so
                    self._pending.pop(group, None)
            took = time.perf_counter() - started
            self._next_round[model] = now + max(self.position_interval, took / POSITION_ROUND_DUTY)
            with contextlib.suppress(Exception):
                await self.averages.get(model)
        if self._pending:
            self._has_pending.set()

    def send_positions(self, limit: int = POSITION_SLICE) -> int:
        """Tell up to about ``limit`` watchers their new place, oldest change first. Returns
        the number of watchers told."""
        sent = 0
        while self._pending and sent < limit:
            group = next(iter(self._pending))
            place = self._pending.pop(group)
            if not group.queued or not group.subscribers:
                continue
            update: PositionUpdate | None = None
            if group.stored is None:
                continue
            for subscriber in group.subscribers:
                if subscriber.told == place:
                    continue
                if update is None:
                    update = PositionUpdate(
                        place[0], place[1], group.stored, self.averages.cached(group.model)
                    )
                subscriber.told = place
                subscriber.offer_position(update)
                sent += 1
        self.positions_sent += sent
        return sent

    async def _ranks(self, model: str, groups: list[Watched]) -> tuple[dict[str, int], int]:
        """1-based places of the given requests, and the queue's length: one read of the
        whole queue when the watched are a good share of it, else one ZRANK each (so a
        long queue with few watchers costs work per watcher, not per queued request)."""
        length = await self.queue.queue_length(model)
        ranks: dict[str, int] = {}
        if len(groups) * FULL_READ_RATIO > length:
            queue = await self.queue.queue_members(model)
            wanted = {g.request_id.encode(): g.request_id for g in groups}
            for place, member in enumerate(queue, 1):
                request_id = wanted.get(member[-_ID_LENGTH:])
                if request_id is not None:
                    ranks[request_id] = place
            return ranks, len(queue)
        unknown = [g for g in groups if g.member is None]
        if unknown:
            members = await self.queue.members_of(model, [g.request_id for g in unknown])
            for group, known in zip(unknown, members, strict=True):
                group.member = known
        ranked = [g for g in groups if g.member is not None]
        found = await self.queue.ranks(model, [cast(bytes, g.member) for g in ranked])
        for group, rank in zip(ranked, found, strict=True):
            if rank is not None:
                ranks[group.request_id] = rank + 1
        return ranks, length

    # ---- the loops ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(
            self._read_forever(stop),
            self._positions_forever(stop),
            self._send_positions_forever(stop),
            self._sweep_forever(stop),
        )

    async def _read_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                read = await self.read_once(block_ms=500)
                if self._hands_over and not self._live and 0 < read < HANDED_READ_PAUSE_BELOW:
                    await self._pause.wait(None, HANDED_READ_PAUSE_SECONDS)
            except Exception as exc:  # Redis away: resume from the last id read.
                log.warning("event read failed", error=str(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)

    async def _positions_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                if self._dirty:
                    await self.push_positions()
            except Exception as exc:
                log.warning("position update failed", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(self.position_interval / 4, 0.01))

    async def _send_positions_forever(self, stop: asyncio.Event) -> None:
        """Hand out place changes in slices, pausing so they stay under ``position_rate``."""
        while not stop.is_set():
            if not self._pending:
                self._has_pending.clear()
                waiter = asyncio.ensure_future(self._has_pending.wait())
                stopper = asyncio.ensure_future(stop.wait())
                try:
                    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                    stopper.cancel()
                continue
            sent = self.send_positions()
            await asyncio.sleep(sent / self.position_rate)

    async def _sweep_forever(self, stop: asyncio.Event) -> None:
        """Watchers quiet for IDLE_CHECK_SECONDS check the request's stream themselves
        (nothing should be missed, but a reader restart or a trimmed stream could). At most
        IDLE_CHECKS_PER_SECOND of them a second, so watchers that opened together and stayed
        quiet together do not all read Redis at once."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            self.sweep_quiet()

    def sweep_quiet(self, limit: int = IDLE_CHECKS_PER_SECOND) -> int:
        now = time.monotonic()
        quiet_since = now - IDLE_CHECK_SECONDS
        woken = 0
        for subscriber in self._subscribers:
            if woken >= limit:
                break
            if subscriber.heard < quiet_since and not subscriber.pending:
                subscriber.heard = now
                subscriber.mark_lagged()
                woken += 1
        return woken
