"""A Submit expected by the dispatcher (``Dispatcher.expect``) on a real Redis: a loop
holding a slot of the model takes the claim that rides the enqueue's round trip, in fair
order, and nothing is claimed twice or left leased when the Submit queues nothing or its
caller goes away."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import redis.asyncio as aioredis

from services.scheduler.dispatcher import Dispatcher, DispatchSettings, _KeptSlot
from services.scheduler.quotas import Limits, Quotas, StorageCharge
from services.scheduler.store import FinishedWork, Lease, QueueStore
from tests.scheduler.factories import new_request
from usher.keys import ModelKeys
from usher.queue.records import QUEUED, RUNNING
from usher.v1 import pool_pb2, request_pb2

MODEL = "llama3.2"


async def dispatcher(store: QueueStore, redis_client: aioredis.Redis) -> Dispatcher:
    # A slot is taken as in hand (Dispatcher._claim): the Pool is never called. The
    # scripts are loaded (another model's request queued, a claim of an empty queue), as
    # in a running service.
    await store.submit(new_request(model="warm"))
    assert await store.claim(MODEL, "warm") is None
    return Dispatcher(
        store, Quotas(redis_client), DispatchSettings("unused:1", "t"), pool=cast(Any, object())
    )


async def parked(loops: Dispatcher) -> asyncio.Task[Lease | None]:
    """A loop with a slot of MODEL in hand, waiting for the expected Submit."""
    claim = asyncio.create_task(loops._claim(MODEL, external=False))
    for _ in range(5):
        await asyncio.sleep(0)
    assert loops._parked.get(MODEL), "the loop waits for the Submit"
    return claim


async def test_the_claim_rides_the_enqueue_and_reaches_the_waiting_loop(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    loops = await dispatcher(store, redis_client)
    expected = await loops.expect(MODEL)
    claim = await parked(loops)
    outcome = await expected.enqueue(new_request())
    lease = await claim
    assert outcome.status == "queued"
    assert lease is not None and lease is outcome.claimed
    assert lease.request.id == outcome.request_id
    stored = await store.inspect(MODEL, outcome.request_id)
    assert stored is not None and stored.state == RUNNING
    assert await redis_client.zscore(ModelKeys(MODEL).leases, outcome.request_id) is not None
    # Queued, then claimed: nothing is believed waiting, no Submit expected.
    assert loops._demand == ({}, {}) and not loops._expected and not loops._parked


async def test_the_claim_beside_an_enqueue_takes_the_fair_head(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    await dispatcher(store, redis_client)
    earlier = await store.submit(new_request(user="bob"))
    outcome = await store.submit(new_request(user="alice"), claim_for="loop")
    lease = outcome.claimed
    assert isinstance(lease, Lease)
    assert lease.request.id == earlier.request_id  # first come, first served: bob's
    assert lease.owner == "loop"
    mine = await store.inspect(MODEL, outcome.request_id)
    assert mine is not None and mine.state == QUEUED


async def test_a_submit_that_queues_nothing_sends_the_loop_back_without_a_claim(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    loops = await dispatcher(store, redis_client)
    expected = await loops.expect(MODEL)
    claim = await parked(loops)
    expected.end()  # e.g. admission refused it
    assert await claim is None  # the slot goes back; no claim was made
    assert not loops._expected and not loops._parked
    assert expected.end() is False  # a second end changes nothing


async def test_a_deduplicated_submit_hands_over_what_its_claim_found(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    loops = await dispatcher(store, redis_client)
    first = await store.submit(new_request(fingerprint="same"))
    taken = await store.claim(MODEL, "elsewhere")
    assert taken is not None and taken.request.id == first.request_id
    expected = await loops.expect(MODEL)
    claim = await parked(loops)
    outcome = await expected.enqueue(new_request(fingerprint="same"))
    assert outcome.status == "dedup" and outcome.request_id == first.request_id
    assert await claim is None  # the queue was empty: nothing to run
    assert loops._demand == ({}, {})


async def test_a_caller_gone_mid_enqueue_still_hands_the_lease_to_its_loop(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    loops = await dispatcher(store, redis_client)
    expected = await loops.expect(MODEL)
    claim = await parked(loops)
    submit = asyncio.create_task(expected.enqueue(new_request()))
    await asyncio.sleep(0)  # the enqueue and its claim are on their way
    submit.cancel()
    lease = await asyncio.wait_for(claim, 5)
    assert lease is not None  # the loop runs it: no lease left to run out unrun
    stored = await store.inspect(MODEL, lease.request.id)
    assert stored is not None and stored.state == RUNNING


async def test_without_a_waiting_loop_the_enqueue_wakes_the_loops(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    loops = await dispatcher(store, redis_client)
    expected = await loops.expect(MODEL)
    assert loops._work(external=False) == {MODEL: 1}  # a loop may reserve for it already
    outcome = await expected.enqueue(new_request())
    assert outcome.status == "queued" and outcome.claimed is False
    assert loops._demand == ({MODEL: 1}, {}) and not loops._expected
    lease = await loops._claim(MODEL, external=False)  # claimed as before
    assert lease is not None and lease.request.id == outcome.request_id


async def test_after_redis_lost_its_scripts_the_loop_claims_on_its_own(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    loops = await dispatcher(store, redis_client)
    await redis_client.script_flush()  # a restart: the pipeline is sent again, once
    expected = await loops.expect(MODEL)
    claim = await parked(loops)
    outcome = await expected.enqueue(new_request())
    # Nothing of the first attempt ran but its index writes: the claim rides the second.
    assert outcome.status == "queued" and isinstance(outcome.claimed, Lease)
    lease = await claim
    assert lease is not None and lease.request.id == outcome.request_id
    assert await redis_client.zcard(ModelKeys(MODEL).leases) == 1


async def test_an_enqueue_sent_again_carries_its_claim_and_the_admission_runs_once(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    """Redis lost its scripts and one process loaded the admission's alone again: the first
    attempt's admission runs, the enqueue does not. The pipeline is sent again with the
    enqueue and the claim riding it, without the admission: the request is charged once."""
    earlier = await store.submit(new_request())
    quotas = Quotas(redis_client)
    request = new_request()
    now = int(time.time() * 1000)
    admission = quotas.admission(
        request.tenant, request.id, 1.0, Limits(), now + 60_000, StorageCharge(1000, 10**9, now)
    )
    assert admission is not None
    await redis_client.script_flush()
    await redis_client.script_load(admission.script.script)
    outcome = await store.submit(request, claim_for="loop", admission=admission)
    assert outcome.status == "queued"
    assert isinstance(outcome.claimed, Lease)
    assert outcome.claimed.request.id == earlier.request_id  # the fair head
    assert await redis_client.zcard(ModelKeys(MODEL).leases) == 1
    assert await redis_client.zcard(ModelKeys(MODEL).queue) == 1  # the new one waits
    assert await quotas.stored_bytes(request.tenant) == 1000


async def test_a_submit_to_an_empty_queue_is_written_running_for_its_claim(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    """The claim riding an enqueue to an empty queue takes the request as it is written:
    no queue or deadline entry, the lease and the fair clock as a claim of it leaves them,
    and its 'running' event alone (it was never seen queued), on the model's stream alone."""
    await dispatcher(store, redis_client)
    mk = ModelKeys(MODEL)
    outcome = await store.submit(new_request(), claim_for="loop")
    lease = outcome.claimed
    assert isinstance(lease, Lease) and lease.request.id == outcome.request_id
    assert lease.request.state == RUNNING and lease.request.attempts == 1
    assert lease.owner == "loop" and lease.event_id
    stored = await store.inspect(MODEL, outcome.request_id)
    assert stored is not None and stored.state == RUNNING
    assert stored.lease_token == lease.token and stored.started_ms > 0
    assert await redis_client.zcard(mk.queue) == 0
    assert await redis_client.zscore(mk.deadlines, outcome.request_id) is None
    assert await redis_client.zscore(mk.leases, outcome.request_id) is not None
    assert float(await redis_client.hget(mk.fairness, "vtime") or 0) == lease.request.start
    events = cast(list[tuple[bytes, dict[bytes, bytes]]], await redis_client.xrange(mk.events))
    mine = [e for _, e in events if e[b"id"] == outcome.request_id.encode()]
    assert [(e[b"type"], e[b"eid"]) for e in mine] == [(b"running", b"0-2")]
    # Its 'running' is on the model's stream alone, under a known id a watch stands past.
    assert await redis_client.xlen(mk.request_events(outcome.request_id)) == 0
    assert lease.event_id == "0-2"
    start = await store.open_watch(MODEL, outcome.request_id, "0-0")
    assert start is not None and start.tip == "0-2" and not start.events
    # The lease is as good as a claim's: the answer completes it.
    assert await store.heartbeat(lease) == 0


async def test_a_request_written_running_at_once_ends_without_a_stream_of_its_own(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    """Its result read alone (nothing streamed), it ends on the model's stream alone, under
    the known id after its 'running': no stream of its own is written or given an expiry,
    and a watch from the start, or from either id, stands past them; the record expires."""
    await dispatcher(store, redis_client)
    mk = ModelKeys(MODEL)
    outcome = await store.submit(new_request(), claim_for="loop")
    lease = outcome.claimed
    assert isinstance(lease, Lease) and lease.event_id == "0-2"
    # The Submit's ETA: it holds its slot, no wait (no running count read for it).
    assert outcome.averages is not None and outcome.averages[0].running == 0
    done = FinishedWork(state=request_pb2.REQUEST_STATE_COMPLETED, result=b'{"text": "hi"}')
    assert await store.finish(lease, done, streamed=False)
    assert not await redis_client.exists(mk.request_events(outcome.request_id))
    events = cast(list[tuple[bytes, dict[bytes, bytes]]], await redis_client.xrange(mk.events))
    mine = [e for _, e in events if e[b"id"] == outcome.request_id.encode()]
    assert [(e[b"type"], e[b"eid"]) for e in mine] == [(b"running", b"0-2"), (b"completed", b"0-3")]
    assert await redis_client.ttl(mk.request(outcome.request_id)) > 0
    for after in ("0-0", "0-2", "0-3"):
        start = await store.open_watch(MODEL, outcome.request_id, after)
        assert start is not None and not start.events
        assert start.stored.state == request_pb2.REQUEST_STATE_COMPLETED
    # Streamed, or claimed from the queue, it keeps its own stream as before.
    streamed = await store.submit(new_request(), claim_for="loop")
    assert isinstance(streamed.claimed, Lease)
    await store.progress(streamed.claimed, "tokens", {"tokens": 1, "text": "h"})
    assert await store.finish(streamed.claimed, done)
    kinds = cast(
        list[tuple[bytes, dict[bytes, bytes]]],
        await redis_client.xrange(mk.request_events(streamed.request_id)),
    )
    assert [e[b"type"] for _, e in kinds] == [b"tokens", b"completed"]
    assert await redis_client.ttl(mk.request_events(streamed.request_id)) > 0


async def xranges(redis_client: aioredis.Redis) -> int:
    stats = await redis_client.info("commandstats")
    return int(stats.get("cmdstat_xrange", {}).get("calls", 0))


async def test_a_result_only_request_written_running_at_once_is_watched_without_a_stream_read(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    """Its record says its own stream holds nothing ('quiet'): a watch reads none, while
    it runs and once it ended unstreamed. Anything written to its stream ends that: output,
    a cancel asked for, a requeue."""
    await dispatcher(store, redis_client)
    rk = ModelKeys(MODEL).request
    done = FinishedWork(state=request_pb2.REQUEST_STATE_COMPLETED, result=b'{"text": "hi"}')
    outcome = await store.submit(new_request(result_only=True), claim_for="loop")
    lease = outcome.claimed
    assert isinstance(lease, Lease)
    assert await redis_client.hget(rk(outcome.request_id), "quiet") == b"1"
    before = await xranges(redis_client)
    start = await store.open_watch(MODEL, outcome.request_id, "0-0")
    assert start is not None and start.tip == "0-2" and not start.events
    assert await store.finish(lease, done, streamed=False)
    start = await store.open_watch(MODEL, outcome.request_id, "0-2")
    assert start is not None and start.stored.state == request_pb2.REQUEST_STATE_COMPLETED
    assert await xranges(redis_client) == before
    # Not result only, or queued first: never quiet.
    for request in (new_request(), new_request(result_only=True)):
        plain = await store.submit(request)
        assert not await redis_client.hget(rk(plain.request_id), "quiet")
    # Output written ends its quiet: a watch reads the stream again, and sees it.
    await store.drain(MODEL, "cleared for the next case")
    outcome = await store.submit(new_request(result_only=True), claim_for="loop")
    lease = outcome.claimed
    assert isinstance(lease, Lease)
    await store.progress(lease, "tokens", {"tokens": 1, "text": "h"})
    assert not await redis_client.hget(rk(outcome.request_id), "quiet")
    start = await store.open_watch(MODEL, outcome.request_id, "0-0")
    assert start is not None and [f["type"] for _, f in start.events] == ["tokens"]
    # So does a requeue, and a cancel asked for.
    for stop in ("requeue", "cancel"):
        outcome = await store.submit(new_request(result_only=True), claim_for="loop")
        lease = outcome.claimed
        assert isinstance(lease, Lease)
        if stop == "requeue":
            assert await store.requeue(lease, "no instance free")
        else:
            assert await store.cancel(MODEL, outcome.request_id, "acme/alice", False, "stop") == (
                "cancel_requested"
            )
        assert not await redis_client.hget(rk(outcome.request_id), "quiet")
        start = await store.open_watch(MODEL, outcome.request_id, "0-0")
        assert start is not None and len(start.events) == 1
        await store.drain(MODEL, "cleared for the next case")


def kept_after_an_answer(loops: Dispatcher) -> _KeptSlot:
    """A slot of MODEL the Pool kept for a loop after its answer, counted as the
    dispatcher counts one (Dispatcher._done)."""
    loops._reserving[False] += 1
    loops._count_kept(MODEL, +1)
    return _KeptSlot(pool_pb2.Slot(id="kept", model=MODEL), counted=True)


async def next_with_kept_slot(loops: Dispatcher, kept: _KeptSlot) -> Lease | None:
    """The loop's next turn with its kept slot: wait for its model's next, then claim."""
    assert await loops._kept_for_work(kept, loops._work(False), False) is not None
    return await loops._claim(MODEL, external=False)


async def test_a_loop_holding_a_kept_slot_takes_the_expected_submit(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    loops = await dispatcher(store, redis_client)
    kept = kept_after_an_answer(loops)
    waiting = asyncio.create_task(loops._kept_for_work(kept, loops._work(False), False))
    await asyncio.sleep(0)
    assert loops._kept_waiting.get(MODEL), "nothing queued: it waits for the model's next"
    expected = await loops.expect(MODEL)  # the Submit wakes it, before its admission
    assert (await waiting) is not None  # the slot is for the expected request
    claim = await parked(loops)
    outcome = await expected.enqueue(new_request())
    lease = await claim
    assert lease is not None and lease.request.id == outcome.request_id


async def test_an_enqueue_waits_the_turns_the_loop_it_woke_from_a_kept_slot_takes_to_park(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    """The Submit goes straight from its expectation to its enqueue: the loop it woke from
    a kept slot parks a few loop turns later, and the enqueue waits for it, so the claim
    still rides."""
    loops = await dispatcher(store, redis_client)
    running = asyncio.create_task(next_with_kept_slot(loops, kept_after_an_answer(loops)))
    await asyncio.sleep(0)
    expected = await loops.expect(MODEL)
    outcome = await expected.enqueue(new_request())
    assert isinstance(outcome.claimed, Lease)  # it rode the enqueue
    lease = await running
    assert lease is outcome.claimed and lease.request.id == outcome.request_id
    assert not loops._kept_slots


async def test_an_enqueue_waits_for_a_loop_still_writing_its_last_answer_with_a_kept_slot(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    """The client's next Submit arrives while the loop whose answer it just got is still
    writing that answer's settle, its slot kept: nothing is waiting to be woken, and the
    enqueue waits (briefly) for that loop to park."""
    loops = await dispatcher(store, redis_client)
    kept = kept_after_an_answer(loops)
    settled = asyncio.Event()

    async def loop_finishing_its_answer() -> Lease | None:
        await settled.wait()  # the settle's round trip
        return await next_with_kept_slot(loops, kept)

    running = asyncio.create_task(loop_finishing_its_answer())
    expected = await loops.expect(MODEL)
    submit = asyncio.create_task(expected.enqueue(new_request()))
    await asyncio.sleep(0.001)
    settled.set()
    outcome = await submit
    assert isinstance(outcome.claimed, Lease)
    assert await running is outcome.claimed


async def test_a_slot_is_kept_for_a_model_asked_again_at_once(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    loops = await dispatcher(store, redis_client)
    slot = pool_pb2.Slot(id="s", model=MODEL, route=request_pb2.ROUTE_LOCAL)
    assert not loops._worth_keeping(slot)  # nothing known of the model
    (await loops.expect(MODEL)).end()
    assert not loops._worth_keeping(slot)  # one request: no gap to go by
    (await loops.expect(MODEL)).end()
    assert loops._worth_keeping(slot)  # asked again within keep_slot_seconds
    other = await dispatcher(store, redis_client)
    other._arrivals[MODEL] = (0.0, other.settings.keep_slot_seconds + 1)
    assert not other._worth_keeping(slot)  # its requests come seldom: nothing is held


async def test_a_request_left_queued_by_the_claim_beside_it_wakes_a_loop(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    loops = await dispatcher(store, redis_client)
    earlier = await store.submit(new_request(user="bob"))  # through another replica
    expected = await loops.expect(MODEL)
    claim = await parked(loops)
    idle = asyncio.create_task(loops._idle[False].wait(None, 5))
    await asyncio.sleep(0)
    outcome = await expected.enqueue(new_request(user="alice"))
    lease = await claim
    assert lease is not None and lease.request.id == earlier.request_id  # the fair head
    await asyncio.wait_for(idle, 1)  # alice's request is still queued: a loop wakes for it
    assert outcome.status == "queued"


async def test_a_loop_parks_for_the_expected_submit_while_another_claims_the_queued_one(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    """A request queued here and a loop already claiming it: the next loop with a slot
    parks for the expected Submit instead of going for the same request, so the claim
    riding that Submit's enqueue takes its own request (not the one before it, leaving
    its own queued for yet another claim, and so on for every Submit after it)."""
    loops = await dispatcher(store, redis_client)
    earlier = await store.submit(new_request(user="bob"))
    loops.notify_work(MODEL)  # queued through this replica: believed queued here
    expected = await loops.expect(MODEL)
    first = asyncio.create_task(loops._claim(MODEL, external=False))
    second = asyncio.create_task(loops._claim(MODEL, external=False))
    await asyncio.sleep(0)  # both loops took their first step; no reply has come back
    assert loops._claiming[MODEL] == 1, "the first loop claims bob's request"
    assert loops._parked.get(MODEL), "the second waits for the Submit"
    outcome = await expected.enqueue(new_request(user="alice"), await_end=True)
    claimed, ridden = await first, await second
    assert claimed is not None and claimed.request.id == earlier.request_id
    assert ridden is not None and ridden.request.id == outcome.request_id
    assert outcome.started is not None and expected.ended is not None
    expected.forget_end(outcome.request_id)
    assert loops._demand == ({}, {}) and not loops._claiming and not loops._parked


async def test_a_submit_awaits_the_end_only_of_a_request_its_claim_started(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    loops = await dispatcher(store, redis_client)
    alone = await loops.expect(MODEL)
    # No loop holds a slot: the request is queued, so there is no end here to wait for.
    queued = await alone.enqueue(new_request(), await_end=True)
    assert queued.claimed is False and alone.ended is None
    taken = await store.claim(MODEL, "elsewhere")
    assert taken is not None and taken.request.id == queued.request_id
    # A loop holding a slot and an empty queue: the claim beside the enqueue takes the
    # Submit's own request, whose end it may then wait for.
    fresh = await dispatcher(store, redis_client)
    own = await fresh.expect(MODEL)
    claim = await parked(fresh)
    outcome = await own.enqueue(new_request(), await_end=True)
    lease = await claim
    assert lease is not None and lease.request.id == outcome.request_id
    assert own.ended is not None and not own.ended.done()
    own.forget_end(outcome.request_id)
    assert not fresh._awaited
