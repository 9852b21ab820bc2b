"""The fan-out: one read per batch of state changes, shared updates, paced positions."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace

import pytest

from services.notifier import fanout as fanout_module
from services.notifier.fanout import (
    SUBSCRIBER_BUFFER,
    AveragesCache,
    Fanout,
    PositionUpdate,
    Subscriber,
    Update,
    Watched,
)
from services.notifier.updates import after_event
from services.scheduler.store import FinishedWork, ProgressEvent, QueueStore
from tests.scheduler.factories import new_request
from usher.queue.eta import ModelAverages
from usher.queue.records import QUEUED, RUNNING, StoredRequest, WrittenEvents, to_proto
from usher.v1 import notifier_pb2, request_pb2

MODEL = "fan-model"


async def _queued(store: QueueStore, count: int, user: str = "alice") -> list[StoredRequest]:
    """``count`` queued requests, as read once all are queued (so their places are current)."""
    ids = []
    for _ in range(count):
        request = new_request(model=MODEL, user=user)
        await store.submit(request)
        ids.append(request.id)
    found = [await store.get(i) for i in ids]
    assert all(s is not None for s in found)
    return [s for s in found if s is not None]


async def _drain(fanout: Fanout) -> None:
    """Read everything the model streams hold now."""
    while await fanout.read_once(block_ms=50):
        pass


async def _take(subscriber: Subscriber) -> list[Update | PositionUpdate | None]:
    out: list[Update | PositionUpdate | None] = []
    while subscriber.pending or subscriber.lagged:
        out.append(await asyncio.wait_for(subscriber.get(), 1))
    return out


def _stored(request_id: str = "01JAAAAAAAAAAAAAAAAAAAAAAA") -> StoredRequest:
    return StoredRequest.from_hash(
        {b"id": request_id.encode(), b"model": MODEL.encode(), b"state": str(QUEUED).encode()}
    )


async def test_mailbox_keeps_order_and_coalesces_positions() -> None:
    subscriber = Subscriber(Watched(_stored().id, MODEL))
    first, second = Update({"eid": "1-0"}), Update({"eid": "2-0"})
    averages = (ModelAverages(30.0), 1)
    subscriber.offer(first)
    subscriber.offer_position(PositionUpdate(5, 9, _stored(), averages))
    subscriber.offer(second)
    newest = PositionUpdate(4, 8, _stored(), averages)
    subscriber.offer_position(newest)
    got = await _take(subscriber)
    # The position keeps its first turn but carries the newest place; no second one.
    assert got == [first, newest, second]


async def test_a_watcher_that_falls_behind_is_told_to_replay() -> None:
    subscriber = Subscriber(Watched(_stored().id, MODEL))
    for i in range(SUBSCRIBER_BUFFER + 1):
        subscriber.offer(Update({"eid": f"{i + 1}-0"}))
    assert subscriber.lagged
    assert await asyncio.wait_for(subscriber.get(), 1) is None  # replay from Redis
    assert not subscriber.lagged and subscriber.pending == 0


async def test_a_waiting_watcher_wakes_on_an_update() -> None:
    subscriber = Subscriber(Watched(_stored().id, MODEL))
    waiting = asyncio.ensure_future(subscriber.get())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    update = Update({"eid": "1-0"})
    subscriber.offer(update)
    assert await asyncio.wait_for(waiting, 1) is update


def _count_reads(fanout: Fanout, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, str]]:
    """The records the fan-out reads from now on, one entry a read."""
    reads: list[dict[str, str]] = []
    original = fanout.read_requests

    async def counting(wanted: dict[str, str]) -> dict[str, StoredRequest | None]:
        reads.append(dict(wanted))
        return await original(wanted)

    monkeypatch.setattr(fanout, "read_requests", counting)
    return reads


async def test_watchers_of_one_request_share_one_update_and_one_read(
    store: QueueStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    (stored,) = await _queued(store, 1)
    fanout = Fanout(store)
    await fanout.prime()
    watchers = [fanout.subscribe(stored) for _ in range(3)]
    reads = _count_reads(fanout, monkeypatch)
    lease = await store.claim(MODEL, "test")
    assert lease is not None
    await store.finish(
        lease,
        FinishedWork(
            state=request_pb2.REQUEST_STATE_COMPLETED,
            result=request_pb2.RequestResult(text="the answer").SerializeToString(),
        ),
    )
    await _drain(fanout)
    # RUNNING and COMPLETED came in one batch: one read for both, for all three watchers.
    assert reads == [{stored.id: MODEL}]
    got = [await _take(w) for w in watchers]
    assert all(len(items) == 2 for items in got)
    running, completed = got[0]
    assert all(items[0] is running and items[1] is completed for items in got)
    assert isinstance(completed, Update) and completed.read
    assert completed.kind == notifier_pb2.UPDATE_KIND_COMPLETED
    assert completed.snapshot is not None
    assert completed.snapshot.state == request_pb2.REQUEST_STATE_COMPLETED
    result = request_pb2.RequestResult.FromString(completed.snapshot.result)
    assert result.text == "the answer"
    assert completed.snapshot.payload == b""  # the prompt is never carried to watchers


async def test_a_claim_is_shown_from_its_event_without_a_read(
    store: QueueStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    (stored,) = await _queued(store, 1)
    fanout = Fanout(store)
    await fanout.prime()
    watcher = fanout.subscribe(replace(stored, payload=b"", owners=frozenset()))
    reads = _count_reads(fanout, monkeypatch)
    lease = await store.claim(MODEL, "test")
    assert lease is not None
    await store.cancel(MODEL, stored.id, "acme/alice", False, "enough")
    await _drain(fanout)
    assert reads == []
    running, asked = await _take(watcher)
    assert isinstance(running, Update) and isinstance(asked, Update)
    assert running.read and running.snapshot is not None and asked.snapshot is not None
    # What a read would have shown, field for field.
    read = await store.inspect(MODEL, stored.id)
    assert read is not None
    assert to_proto(running.snapshot) == to_proto(
        replace(read, cancel_requested=False, owners=frozenset())
    )
    assert to_proto(asked.snapshot) == to_proto(replace(read, owners=frozenset()))
    assert asked.snapshot.cancel_requested


async def test_an_event_older_than_the_watchers_read_does_not_turn_it_back(
    store: QueueStore,
) -> None:
    (stored,) = await _queued(store, 1)
    fanout = Fanout(store)
    await fanout.prime()  # the reader starts before the claim: it delivers it late
    lease = await store.claim(MODEL, "test")
    assert lease is not None
    await store.finish(lease, FinishedWork(state=request_pb2.REQUEST_STATE_COMPLETED))
    start = await store.open_watch(MODEL, stored.id, "0-0")
    assert start is not None and start.tip == start.events[-1][0]
    early = fanout.subscribe(stored)  # watching since before the claim
    watcher = fanout.subscribe(start.stored, start.tip)
    await _drain(fanout)
    assert await _take(watcher) == []  # its read had both: not offered again
    running, completed = await _take(early)
    assert isinstance(running, Update) and running.snapshot is start.stored
    assert isinstance(completed, Update) and completed.snapshot is start.stored
    group = fanout._groups[stored.id]
    assert group.stored is start.stored and not group.queued


async def test_a_failed_read_leaves_each_watcher_to_read_for_itself(
    store: QueueStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    (stored,) = await _queued(store, 1)
    fanout = Fanout(store)
    await fanout.prime()
    watcher = fanout.subscribe(stored)

    async def broken(wanted: dict[str, str]) -> dict[str, StoredRequest | None]:
        raise ConnectionError("redis away")

    monkeypatch.setattr(fanout, "read_requests", broken)
    await store.cancel(MODEL, stored.id, "acme/alice", False, "changed my mind")
    await _drain(fanout)
    (update,) = await _take(watcher)
    assert isinstance(update, Update)
    assert update.kind == notifier_pb2.UPDATE_KIND_CANCELLED
    assert not update.read and update.snapshot is None


async def test_queued_snapshots_carry_their_place(store: QueueStore) -> None:
    requests = await _queued(store, 3)
    fanout = Fanout(store)
    found = await fanout.read_requests({r.id: MODEL for r in requests})
    assert [(s.position, s.queue_length) for s in found.values() if s] == [(1, 3), (2, 3), (3, 3)]


async def test_positions_go_only_to_watchers_whose_place_moved(store: QueueStore) -> None:
    requests = await _queued(store, 4)
    fanout = Fanout(store, position_interval=0)
    await fanout.prime()
    watchers = {r.id: fanout.subscribe(r) for r in requests[1:]}
    for r in requests[1:]:
        watchers[r.id].told = (r.position, r.queue_length)
    await fanout.push_positions()
    assert fanout.send_positions() == 0  # nobody moved yet

    await store.cancel(MODEL, requests[0].id, "acme/alice", False, "")
    await _drain(fanout)
    await fanout.push_positions()
    assert fanout.send_positions() == 3
    places = {}
    for request_id, watcher in watchers.items():
        (item,) = await _take(watcher)
        assert isinstance(item, PositionUpdate)
        places[request_id] = (item.position, item.queue_length)
    assert places == {r.id: (i + 1, 3) for i, r in enumerate(requests[1:])}

    # The head starts running: it leaves the queue; only those behind it move.
    lease = await store.claim(MODEL, "test")
    assert lease is not None and lease.request.id == requests[1].id
    await _drain(fanout)
    head_items = await _take(watchers[requests[1].id])
    assert [i.kind for i in head_items if isinstance(i, Update)] == [
        notifier_pb2.UPDATE_KIND_RUNNING
    ]
    await fanout.push_positions()
    assert fanout.send_positions() == 2
    assert await _take(watchers[requests[1].id]) == []


async def test_position_sending_is_paced_oldest_change_first(store: QueueStore) -> None:
    requests = await _queued(store, 13)
    fanout = Fanout(store, position_interval=0)
    await fanout.prime()
    watchers = [fanout.subscribe(r) for r in requests[2:]]
    for watcher, r in zip(watchers, requests[2:], strict=True):
        watcher.told = (r.position, r.queue_length)
    await store.cancel(MODEL, requests[0].id, "acme/alice", False, "")
    await _drain(fanout)
    await fanout.push_positions()
    assert fanout.send_positions(limit=4) == 4  # the oldest changes first
    assert [w.pending for w in watchers] == [1] * 4 + [0] * 7
    for watcher in watchers[:4]:
        await _take(watcher)

    # They move again before the rest were told: those still waiting keep their turn and
    # get the newest place only; the four already told queue up behind them.
    await store.cancel(MODEL, requests[1].id, "acme/alice", False, "")
    await _drain(fanout)
    await fanout.push_positions()
    assert fanout.send_positions(limit=7) == 7
    assert [w.pending for w in watchers] == [0] * 4 + [1] * 7
    for place, watcher in enumerate(watchers[4:], start=5):
        (item,) = await _take(watcher)
        assert isinstance(item, PositionUpdate)
        assert (item.position, item.queue_length) == (place, 11)
    assert fanout.send_positions(limit=100) == 4
    assert fanout.send_positions(limit=100) == 0


async def test_unsubscribing_the_last_watcher_forgets_the_request(store: QueueStore) -> None:
    (stored,) = await _queued(store, 1)
    fanout = Fanout(store)
    first, second = fanout.subscribe(stored), fanout.subscribe(stored)
    assert fanout.watchers == 2
    fanout.unsubscribe(first)
    assert stored.id in fanout._groups
    fanout.unsubscribe(second)
    assert fanout.watchers == 0 and not fanout._groups and not fanout._by_model


async def test_averages_are_read_once_for_many_callers(
    store: QueueStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    original = store.model_averages

    async def counting(model: str) -> tuple[ModelAverages, int]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return await original(model)

    monkeypatch.setattr(store, "model_averages", counting)
    cache = AveragesCache(store, ttl=60)
    results = await asyncio.gather(*(cache.get(MODEL) for _ in range(50)))
    assert calls == 1 and len({id(r) for r in results}) == 1
    assert cache.cached(MODEL) is results[0]


async def test_quiet_watchers_check_redis_a_few_at_a_time(store: QueueStore) -> None:
    requests = await _queued(store, 5)
    fanout = Fanout(store)
    watchers = [fanout.subscribe(r) for r in requests]
    assert fanout.sweep_quiet() == 0  # nobody has been quiet long enough
    for watcher in watchers:
        watcher.heard -= 3600
    assert fanout.sweep_quiet(limit=3) == 3
    assert fanout.sweep_quiet(limit=3) == 2
    assert fanout.sweep_quiet(limit=3) == 0
    for watcher in watchers:
        assert await asyncio.wait_for(watcher.get(), 1) is None  # replay from Redis


async def test_a_failed_refresh_keeps_the_last_averages(
    store: QueueStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = AveragesCache(store, ttl=0)
    first = await cache.get(MODEL)

    async def broken(model: str) -> tuple[ModelAverages, int]:
        raise ConnectionError("redis away")

    monkeypatch.setattr(store, "model_averages", broken)
    assert await cache.get(MODEL) is first  # stale while the refresh runs (and fails)
    await asyncio.sleep(0.01)
    assert cache.cached(MODEL) is first
    with pytest.raises(ConnectionError):
        await AveragesCache(store).get(MODEL)  # nothing to fall back on: the error shows


async def test_a_long_queue_with_few_watchers_is_ranked_one_by_one(
    store: QueueStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    requests = await _queued(store, 45)
    fanout = Fanout(store, position_interval=0)
    watched = [fanout.subscribe(r).group for r in (requests[3], requests[40])]
    full_reads = 0
    original = store.queue_members

    async def counting(model: str) -> list[bytes]:
        nonlocal full_reads
        full_reads += 1
        return await original(model)

    monkeypatch.setattr(store, "queue_members", counting)
    ranks, length = await fanout._ranks(MODEL, watched)
    assert full_reads == 0 and length == 45
    assert ranks == {requests[3].id: 4, requests[40].id: 41}
    assert all(g.member for g in watched)  # read once, kept
    # Many watched relative to the queue: one read of the whole queue instead.
    many = [fanout.subscribe(r).group for r in requests[:5]]
    ranks, _ = await fanout._ranks(MODEL, many)
    assert full_reads == 1 and ranks == {r.id: i + 1 for i, r in enumerate(requests[:5])}


def test_only_events_that_say_all_they_changed_are_applied() -> None:
    queued = _stored()
    running = after_event(queued, {"type": "running", "attempt": "2", "ts": "1700000000000"})
    assert running is not None
    assert (running.state, running.attempts, running.started_ms) == (
        request_pb2.REQUEST_STATE_RUNNING,
        2,
        1700000000000,
    )
    # Not from a state the claim could not have started from, nor with its facts missing.
    assert after_event(running, {"type": "running", "attempt": "3", "ts": "1"}) is None
    assert after_event(queued, {"type": "running"}) is None
    # A completion carries no result: its record is read.
    assert after_event(running, {"type": "completed", "state": "3", "ts": "2"}) is None


async def test_the_model_servers_start_is_shown_without_a_read(
    store: QueueStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A "started" note changes nothing in the record: its update shows the request as the
    claim left it, with no read of the record."""
    (stored,) = await _queued(store, 1)
    fanout = Fanout(store)
    await fanout.prime()
    start = await store.open_watch(MODEL, stored.id, "0-0")
    assert start is not None
    watcher = fanout.subscribe(start.stored, start.tip)
    reads = _count_reads(fanout, monkeypatch)
    lease = await store.claim(MODEL, "test")
    assert lease is not None
    started: ProgressEvent = ("started", {"instance": "ollama-0", "served_model": MODEL})
    assert await store.progress_events(lease, [started, ("tokens", {"text": "a", "tokens": 1})])
    await _drain(fanout)
    _, note, tokens = await _take(watcher)
    assert isinstance(note, Update) and note.kind == notifier_pb2.UPDATE_KIND_RUNNING
    assert note.snapshot is not None and note.snapshot.state == RUNNING
    assert isinstance(tokens, Update) and tokens.fields["text"] == "a"
    assert reads == []


async def test_a_completion_handed_over_in_process_reaches_watchers_once_without_a_read(
    store: QueueStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """usher serve: the completion's events go to the watchers as its script returns; the
    reader's copies are not offered again and cost no read."""
    (stored,) = await _queued(store, 1)
    fanout = Fanout(store)
    await fanout.prime()
    watcher = fanout.subscribe(replace(stored, payload=b"", owners=frozenset()))
    store.on_written = fanout.hand_over
    reads = _count_reads(fanout, monkeypatch)
    lease = await store.claim(MODEL, "test")
    assert lease is not None
    usage = request_pb2.Usage(completion_tokens=2).SerializeToString()
    await store.finish(
        lease,
        FinishedWork(
            state=request_pb2.REQUEST_STATE_COMPLETED,
            result=request_pb2.RequestResult(text="at once").SerializeToString(),
            usage=usage,
        ),
        progress=[("tokens", {"text": "at once", "tokens": 2})],
    )
    # Handed over before the reader brought the claim: held until it does.
    assert watcher.pending == 0
    await _drain(fanout)
    assert reads == []
    running, tokens, completed = await _take(watcher)
    assert isinstance(running, Update) and running.kind == notifier_pb2.UPDATE_KIND_RUNNING
    assert isinstance(tokens, Update) and tokens.fields["text"] == "at once"
    assert isinstance(completed, Update) and completed.snapshot is not None
    # As a read would show it.
    read = await store.inspect(MODEL, stored.id)
    assert read is not None
    assert to_proto(completed.snapshot) == to_proto(replace(read, owners=frozenset()))
    assert request_pb2.RequestResult.FromString(completed.snapshot.result).text == "at once"
    eids = [i.eid for i in (running, tokens, completed) if isinstance(i, Update)]
    everything = await store.open_watch(MODEL, stored.id, "0-0")
    # (the request's own stream starts with its claim: its queuing went to the model's alone)
    assert everything is not None and eids == [e for e, _ in everything.events]

    # Once the watcher has what came before, a completion goes out before the reader runs.
    (second,) = await _queued(store, 1)
    start = await store.open_watch(MODEL, second.id, "0-0")
    assert start is not None
    other = fanout.subscribe(start.stored, start.tip)
    lease = await store.claim(MODEL, "test")
    assert lease is not None and lease.request.id == second.id
    await _drain(fanout)
    assert [i.kind for i in await _take(other) if isinstance(i, Update)] == [
        notifier_pb2.UPDATE_KIND_RUNNING
    ]
    await store.finish(lease, FinishedWork(state=request_pb2.REQUEST_STATE_FAILED, error="boom"))
    (failed,) = await _take(other)
    assert isinstance(failed, Update) and failed.snapshot is not None
    assert (failed.snapshot.state, failed.snapshot.error) == (
        request_pb2.REQUEST_STATE_FAILED,
        "boom",
    )
    await _drain(fanout)
    assert await _take(other) == [] and reads == []


async def test_a_watcher_missing_earlier_events_gets_a_handed_one_from_the_reader(
    store: QueueStore,
) -> None:
    (stored,) = await _queued(store, 1)
    fanout = Fanout(store)
    await fanout.prime()
    store.on_written = fanout.hand_over
    before = await store.open_watch(MODEL, stored.id, "0-0")
    assert before is not None
    behind = fanout.subscribe(before.stored, before.tip)  # read before the claim
    lease = await store.claim(MODEL, "test")
    assert lease is not None
    after = await store.open_watch(MODEL, stored.id, "0-0")
    assert after is not None
    ahead = fanout.subscribe(after.stored, after.tip)  # read after it; the reader is behind
    await store.finish(lease, FinishedWork(state=request_pb2.REQUEST_STATE_COMPLETED))
    (completed,) = await _take(ahead)  # at once, from the hand-over
    assert isinstance(completed, Update) and completed.kind == notifier_pb2.UPDATE_KIND_COMPLETED
    assert behind.pending == 0  # it lacks the claim: the reader brings both, in order
    await _drain(fanout)
    kinds = [i.kind for i in await _take(behind) if isinstance(i, Update)]
    assert kinds == [notifier_pb2.UPDATE_KIND_RUNNING, notifier_pb2.UPDATE_KIND_COMPLETED]
    assert await _take(ahead) == []


async def test_a_listener_that_fails_does_not_fail_the_completion(store: QueueStore) -> None:
    (stored,) = await _queued(store, 1)
    fanout = Fanout(store)
    await fanout.prime()
    watcher = fanout.subscribe(replace(stored, payload=b"", owners=frozenset()))

    def broken(written: WrittenEvents) -> None:
        raise RuntimeError("listener broke")

    store.on_written = broken
    lease = await store.claim(MODEL, "test")
    assert lease is not None
    done = FinishedWork(state=request_pb2.REQUEST_STATE_COMPLETED)
    assert await store.finish(lease, done) is not None
    await _drain(fanout)  # the reader brings what was not handed over
    kinds = [i.kind for i in await _take(watcher) if isinstance(i, Update)]
    assert kinds[-1] == notifier_pb2.UPDATE_KIND_COMPLETED


async def test_the_readers_pause_keeps_no_live_watcher_waiting(
    store: QueueStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """usher serve: after a read of a few events the reader pauses, so this process's own
    writes come a few to a read; a watcher following a request live (a streamed answer)
    waits for exactly those events, so its arrival ends the pause and none starts while
    it is here."""
    monkeypatch.setattr(fanout_module, "HANDED_READ_PAUSE_SECONDS", 30.0)
    first, second = await _queued(store, 2)
    fanout = Fanout(store)
    await fanout.prime()
    fanout._hands_over = True  # as the first completion handed over in process sets it
    last_only = fanout.subscribe(replace(first, payload=b"", owners=frozenset()), live=False)
    stop = asyncio.Event()
    reading = asyncio.ensure_future(fanout.run(stop))
    try:
        lease = await store.claim(MODEL, "test")
        assert lease is not None and lease.request.id == first.id
        running = await asyncio.wait_for(last_only.get(), 5)
        assert isinstance(running, Update) and running.kind == notifier_pb2.UPDATE_KIND_RUNNING
        # The reader pauses after that read: with no live watcher, output waits for it.
        assert await store.progress(lease, "tokens", {"text": "a", "tokens": 1})
        await asyncio.sleep(0.3)
        assert last_only.pending == 0
        # A live watcher arrives: the pause ends, and no other starts while it watches.
        start = await store.open_watch(MODEL, second.id, "0-0")
        assert start is not None
        live = fanout.subscribe(start.stored, start.tip)
        tokens = await asyncio.wait_for(last_only.get(), 5)
        assert isinstance(tokens, Update) and tokens.fields["text"] == "a"
        for text in ("b", "c"):
            assert await store.progress(lease, "tokens", {"text": text, "tokens": 1})
            more = await asyncio.wait_for(last_only.get(), 5)
            assert isinstance(more, Update) and more.fields["text"] == text
        # Gone: the reader pauses again.
        fanout.unsubscribe(live)
        assert await store.progress(lease, "tokens", {"text": "d", "tokens": 1})
        await asyncio.wait_for(last_only.get(), 5)  # the read that saw it gone, at most
        assert await store.progress(lease, "tokens", {"text": "e", "tokens": 1})
        await asyncio.sleep(0.3)
        assert last_only.pending == 0
    finally:
        stop.set()
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
