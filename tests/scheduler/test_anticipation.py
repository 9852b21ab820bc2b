"""Anticipatory idling (services/scheduler/anticipation.py): the pure decision's properties,
and a real dispatcher on a real Redis holding a slot for a light flow under a flood."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from services.scheduler.anticipation import (
    AnswerSeen,
    Anticipation,
    idle_seconds,
    think_sample,
)
from services.scheduler.dispatcher import Dispatcher, DispatchSettings
from services.scheduler.quotas import Quotas
from services.scheduler.store import Lease, NewRequest, QueueStore
from tests.scheduler.factories import new_request
from usher.queue.fairness import NORMAL_CLASS, flow_key

MODEL = "llama3.2"

windows = st.floats(min_value=0, max_value=1, allow_nan=False)
thinks = st.none() | st.floats(min_value=0, max_value=2, allow_nan=False)


@st.composite
def answers(draw: st.DrawFn) -> AnswerSeen:
    flow_running = draw(st.integers(1, 8))
    model_running = flow_running + draw(st.integers(0, 16))
    flows = draw(st.integers(1, model_running - flow_running + 4))
    return AnswerSeen(
        flow_queued=draw(st.booleans()),
        others_queued=draw(st.booleans()),
        higher_class_queued=draw(st.booleans()),
        flow_running=flow_running,
        model_running=model_running,
        flows_active=flows,
        think_seconds=draw(thinks),
    )


@given(seen=answers(), window=windows)
def test_a_slot_is_held_only_when_every_condition_holds(seen: AnswerSeen, window: float) -> None:
    held = idle_seconds(seen, window)
    assert held in (0.0, window)
    if held > 0:
        assert not seen.flow_queued and seen.others_queued and not seen.higher_class_queued
        assert seen.think_seconds is not None and seen.think_seconds <= window
        # The flow has no more than its share of the slots in service.
        assert seen.flow_running / seen.model_running <= 1 / max(seen.flows_active, 2)


@given(seen=answers(), window=windows, more=st.integers(1, 8))
def test_a_flow_with_more_slots_in_service_is_never_held_for_sooner(
    seen: AnswerSeen, window: float, more: int
) -> None:
    busier = AnswerSeen(
        flow_queued=seen.flow_queued,
        others_queued=seen.others_queued,
        higher_class_queued=seen.higher_class_queued,
        flow_running=seen.flow_running + more,
        model_running=seen.model_running + more,
        flows_active=seen.flows_active,
        think_seconds=seen.think_seconds,
    )
    assert idle_seconds(busier, window) <= idle_seconds(seen, window)


@given(seen=answers())
def test_a_window_of_zero_never_holds(seen: AnswerSeen) -> None:
    assert idle_seconds(seen, 0.0) == 0.0


def test_the_light_flow_beside_a_flood_is_held_for() -> None:
    """The bench's case: two slots, one each; the flood waits, the light flow asks again
    within a few milliseconds."""
    seen = AnswerSeen(False, True, False, 1, 2, 2, 0.003)
    assert idle_seconds(seen, 0.01) == 0.01
    flood = AnswerSeen(False, True, False, 3, 4, 2, 0.003)  # the flood's own flow
    assert idle_seconds(flood, 0.01) == 0.0
    crowd = AnswerSeen(False, True, False, 1, 2, 3, 0.003)  # a third flow waits too
    assert idle_seconds(crowd, 0.01) == 0.0
    urgent = AnswerSeen(False, True, True, 1, 2, 2, 0.003)  # the flood is of a higher class
    assert idle_seconds(urgent, 0.01) == 0.0


@given(gap=st.floats(-1, 100, allow_nan=False), window=windows)
def test_a_think_sample_is_capped_at_twice_the_window(gap: float, window: float) -> None:
    sample = think_sample(gap, window)
    assert 0 <= sample <= 2 * window
    assert sample == min(max(gap, 0), 2 * window)


def dispatcher(store: QueueStore, redis_client: aioredis.Redis, window: float) -> Dispatcher:
    # Slots are taken in hand directly (Dispatcher._claim): the Pool is never called.
    return Dispatcher(
        store,
        Quotas(redis_client),
        DispatchSettings("unused:1", "t", idle_seconds=window),
        pool=cast(Any, object()),
    )


async def submit(loops: Dispatcher, store: QueueStore, request: NewRequest) -> str:
    """Queue ``request`` as Submit does, telling the dispatcher."""
    outcome = await store.submit(request)
    assert outcome.status == "queued"
    loops.notify_submitted(MODEL, flow_key(request.tenant, NORMAL_CLASS), outcome.request_id)
    return outcome.request_id


async def claimed(loops: Dispatcher) -> Lease:
    lease = await loops._claim(MODEL, external=False)
    assert lease is not None
    return lease


def ended(loops: Dispatcher, lease: Lease) -> None:
    loops._answered(lease)
    flow = flow_key(lease.request.tenant, NORMAL_CLASS)
    loops._anticipation.ended(MODEL, flow, lease.request.id)


async def flood_and_a_light_flow(
    loops: Dispatcher, store: QueueStore
) -> tuple[list[str], Lease, Lease]:
    """Alice floods (four requests); carol asks, gets her answer and asks again at once (her
    think time is measured). Returns the flood, and the two requests in service (two
    slots, one each): alice's second and carol's second."""
    flood = [await submit(loops, store, new_request(user="alice")) for _ in range(4)]
    await submit(loops, store, new_request(user="carol", org="globex"))
    first = await claimed(loops)  # equal start tags: first come, first served
    light = await claimed(loops)
    assert (first.request.id, light.request.user) == (flood[0], "carol")
    ended(loops, light)  # her first answer: her think time is not known yet, no hold
    await submit(loops, store, new_request(user="carol", org="globex"))
    heavy = await claimed(loops)  # her second starts at her first's finish, behind alice's
    assert heavy.request.id == flood[1]
    ended(loops, first)  # alice has more queued: no hold
    light = await claimed(loops)
    assert light.request.user == "carol"
    return flood, heavy, light


async def test_a_slot_held_for_the_light_flow_takes_its_next_request_before_the_flood(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    loops = dispatcher(store, redis_client, window=5.0)
    flood, _, light = await flood_and_a_light_flow(loops, store)
    ended(loops, light)  # carol's answer: the next slot is held for her
    holder = asyncio.create_task(claimed(loops))
    await asyncio.sleep(0)  # the slot is in hand and waits
    assert not holder.done()
    asked = await submit(loops, store, new_request(user="carol", org="globex"))
    # In fair order her request is behind alice's third (it starts at her last finish).
    assert (await holder).request.id == asked
    assert (await claimed(loops)).request.id == flood[2]  # then the flood goes on in order


async def test_an_answered_request_is_no_longer_in_service(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    """Its answer frees its slot while its completion is still being written: the slot
    running the next request meanwhile is one slot in service, not two."""
    loops = dispatcher(store, redis_client, window=5.0)
    for _ in range(2):
        await submit(loops, store, new_request(user="alice"))
    first = await claimed(loops)
    loops._answered(first)  # its completion not written yet: no ended() so far
    await claimed(loops)  # the freed slot runs the next
    assert loops._anticipation.running(MODEL) == 1
    assert loops._anticipation._peak[MODEL][0] == 1


async def test_a_request_that_came_before_the_slot_is_claimed_on_it(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    loops = dispatcher(store, redis_client, window=5.0)
    flood, _, light = await flood_and_a_light_flow(loops, store)
    ended(loops, light)
    asked = await submit(loops, store, new_request(user="carol", org="globex"))
    assert (await claimed(loops)).request.id == asked
    assert (await claimed(loops)).request.id == flood[2]


async def test_when_the_window_passes_the_slot_goes_to_the_fair_head(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    loops = dispatcher(store, redis_client, window=0.05)
    flood, _, light = await flood_and_a_light_flow(loops, store)
    ended(loops, light)
    assert (await claimed(loops)).request.id == flood[2]  # carol sent nothing in time


async def test_a_flow_that_comes_back_slowly_is_not_waited_for(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    loops = dispatcher(store, redis_client, window=0.01)
    flood = [await submit(loops, store, new_request(user="alice")) for _ in range(4)]
    await submit(loops, store, new_request(user="carol", org="globex"))
    first = await claimed(loops)
    light = await claimed(loops)
    ended(loops, light)
    await asyncio.sleep(0.05)  # carol thinks longer than the window
    await submit(loops, store, new_request(user="carol", org="globex"))
    assert (await claimed(loops)).request.id == flood[1]
    ended(loops, first)
    light = await claimed(loops)
    assert light.request.user == "carol"
    ended(loops, light)  # no hold: her think time is over the window
    await submit(loops, store, new_request(user="carol", org="globex"))
    assert (await claimed(loops)).request.id == flood[2]  # a hold would have taken hers


async def test_no_slot_is_held_when_more_flows_wait_than_there_are_slots(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    """Dave waits too: carol has her share of the two slots in service but not of the three
    flows, so her answer's slot goes on in fair order (to dave), however quick she is."""
    loops = dispatcher(store, redis_client, window=5.0)
    _, _, light = await flood_and_a_light_flow(loops, store)
    dave = await submit(loops, store, new_request(user="dave", org="initech"))
    ended(loops, light)
    await submit(loops, store, new_request(user="carol", org="globex"))
    assert (await claimed(loops)).request.id == dave


async def test_the_flood_is_never_held_for(store: QueueStore, redis_client: aioredis.Redis) -> None:
    """Alice's answer with more of hers queued: no hold for her, the next slot takes the
    fair head however quickly she sends more."""
    loops = dispatcher(store, redis_client, window=5.0)
    flood, heavy, _ = await flood_and_a_light_flow(loops, store)
    ended(loops, heavy)
    await submit(loops, store, new_request(user="alice"))
    assert (await claimed(loops)).request.id == flood[2]


async def test_a_claim_of_a_request_no_longer_queued_takes_the_fair_head(
    store: QueueStore,
) -> None:
    ids = [(await store.submit(new_request(user=u))).request_id for u in ("alice", "bob")]
    gone = await store.claim(MODEL, "other")
    assert gone is not None and gone.request.id == ids[0]
    again = await store.claim(MODEL, "here", first=ids[0])  # claimed elsewhere meanwhile
    assert again is not None and again.request.id == ids[1]


def flooding(holds: Anticipation, flood: str) -> None:
    """``flood`` has one request in service here and another queued."""
    holds.arrived(MODEL, flood, "flood-1")
    holds.started(MODEL, flood, "flood-1")
    holds.arrived(MODEL, flood, "flood-2")


async def test_a_flow_whose_holds_run_out_is_soon_not_held_for() -> None:
    """Carol's requests go through another replica, or she stopped: each hold that runs out
    counts as the longest think time, and after a few she is not waited for."""
    holds = Anticipation(0.01)
    light, flood = flow_key("globex/carol", NORMAL_CLASS), flow_key("acme/alice", NORMAL_CLASS)
    flooding(holds, flood)
    holds.arrived(MODEL, light, "light-0")
    held: list[bool] = []
    for n in range(8):
        holds.started(MODEL, light, f"light-{n}")
        holds.answered(MODEL, light, f"light-{n}", others_queued=True)
        holds.ended(MODEL, light, f"light-{n}")
        held.append(holds.holding_for(MODEL) == [light])
        if n == 0:
            holds.arrived(MODEL, light, "light-1")  # once at once: her think time is short
        else:
            # Nothing of hers comes here: a hold runs out, no hold is none.
            assert await holds.first_claim(MODEL) == ("" if held[-1] else None)
    assert held[:5] == [False, True, True, True, True]  # unknown at first, then held for
    assert held[5:] == [False] * 3


async def test_a_request_claimed_before_its_enqueue_answered_is_not_counted_waiting() -> None:
    """Under load a loop's claim can take Carol's request before her Submit's enqueue has
    answered (the claim beside it finds it queued): told of it late, she is not counted as
    waiting, so her answer is still held for and her think time still measured."""
    holds = Anticipation(5.0)
    light, flood = flow_key("globex/carol", NORMAL_CLASS), flow_key("acme/alice", NORMAL_CLASS)
    flooding(holds, flood)
    for n in range(2):  # her second answer comes with her think time known
        holds.started(MODEL, light, f"light-{n}")  # claimed first...
        holds.arrived(MODEL, light, f"light-{n}")  # ...then her enqueue's answer
        holds.answered(MODEL, light, f"light-{n}", others_queued=True)
        holds.ended(MODEL, light, f"light-{n}")
    assert holds.holding_for(MODEL) == [light]
    # Claimed elsewhere before it was told here, her next request ends the hold at once.
    holds.started(MODEL, light, "light-2")
    holds.arrived(MODEL, light, "light-2")
    assert await asyncio.wait_for(holds.first_claim(MODEL), 1) == "light-2"


@pytest.mark.parametrize(("light_class", "held"), [(2, True), (3, True), (5, False)])
async def test_no_slot_is_held_for_a_flow_while_a_higher_class_waits(
    light_class: int, held: bool
) -> None:
    """A hold claims ahead of the queue's order, priority included: a BATCH tenant is not
    held for while NORMAL work waits; a HIGH or NORMAL one is."""
    holds = Anticipation(5.0)
    light, flood = flow_key("globex/carol", light_class), flow_key("acme/alice", NORMAL_CLASS)
    flooding(holds, flood)
    for n in range(2):  # her second answer comes with her think time known
        holds.arrived(MODEL, light, f"light-{n}")
        holds.started(MODEL, light, f"light-{n}")
        holds.answered(MODEL, light, f"light-{n}", others_queued=True)
        holds.ended(MODEL, light, f"light-{n}")
    assert holds.holding_for(MODEL) == ([light] if held else [])
