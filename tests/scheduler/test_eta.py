"""The queued-wait estimate under fair queuing (usher/queue/eta.py), pure and on Redis."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.scheduler.store import QueueStore
from tests.scheduler.factories import new_request
from usher.queue import eta, fairness, records

MODEL = "llama3.2"

aheads = st.integers(min_value=0, max_value=500)
slot_counts = st.integers(min_value=1, max_value=64)
services = st.floats(0.01, 600)
competitor = st.tuples(st.floats(0, 200), st.floats(0, 20))
competitor_lists = st.lists(competitor, max_size=8)


def right_side(
    wait: float,
    ahead: int,
    free: int,
    slots: int,
    service: float,
    competitors: list[tuple[float, float]],
) -> float:
    """The equation fair_wait solves: its answer T is the least T with T = right_side(T)."""
    overtaking = sum(min(room, rate * wait) for room, rate in competitors)
    return max(0.0, ahead + overtaking - free + 1) * service / slots


@given(ahead=aheads, free=st.integers(0, 8), slots=slot_counts, service=services)
def test_without_competitors_the_wait_is_the_place_in_line(
    ahead: int, free: int, slots: int, service: float
) -> None:
    wait = eta.fair_wait(ahead, free, slots, service)
    assert wait == pytest.approx(max(0, ahead - free + 1) * service / slots)


@given(
    ahead=aheads,
    free=st.integers(0, 8),
    slots=slot_counts,
    service=services,
    competitors=competitor_lists,
)
def test_the_wait_is_the_least_fixed_point(
    ahead: int, free: int, slots: int, service: float, competitors: list[tuple[float, float]]
) -> None:
    wait = eta.fair_wait(ahead, free, slots, service, competitors)
    assert wait >= 0
    assert wait == pytest.approx(
        right_side(wait, ahead, free, slots, service, competitors), rel=1e-6, abs=1e-9
    )
    # Least: every shorter wait still has more work ahead than time to do it.
    for fraction in (0.0, 0.25, 0.5, 0.9, 0.999):
        shorter = wait * fraction
        if shorter < wait:
            assert right_side(shorter, ahead, free, slots, service, competitors) >= shorter
    # Bounded by the place in line and by every flow filling its room.
    base = max(0, ahead - free + 1) * service / slots
    everything = sum(room for room, rate in competitors if rate > 0)
    assert base * (1 - 1e-9) <= wait
    if ahead - free + 1 > 0:
        assert wait <= (ahead - free + 1 + everything) * service / slots * (1 + 1e-9)


@given(
    ahead=aheads,
    slots=slot_counts,
    service=services,
    competitors=competitor_lists,
    extra=competitor,
)
def test_more_work_or_competition_never_shortens_the_wait(
    ahead: int,
    slots: int,
    service: float,
    competitors: list[tuple[float, float]],
    extra: tuple[float, float],
) -> None:
    wait = eta.fair_wait(ahead, 0, slots, service, competitors)
    assert eta.fair_wait(ahead + 1, 0, slots, service, competitors) >= wait * (1 - 1e-9)
    assert eta.fair_wait(ahead, 0, slots, service, [*competitors, extra]) >= wait * (1 - 1e-9)
    assert eta.fair_wait(ahead, 0, slots + 1, service, competitors) <= wait * (1 + 1e-9)


def test_a_free_slot_means_it_starts_now() -> None:
    assert eta.fair_wait(2, 3, 4, 10.0, [(50, 5.0)]) == 0.0
    assert eta.fair_wait(3, 3, 4, 10.0) == pytest.approx(2.5)  # all slots taken: 1 of 4 ends


def flow(
    name: str, finish: float, rate: float = 1.0, cost: float = 100.0, weight: float = 1.0
) -> eta.FlowActivity:
    return eta.FlowActivity(name, finish, rate, cost, weight)


def test_room_is_the_virtual_distance_to_our_tag_in_requests() -> None:
    lead = fairness.DEFAULT_PRIORITY_LEAD
    # Its next request starts at its finish tag 600; ours at 1000; each of its requests
    # moves its tag by 100 / 2.
    assert eta.overtaking_room(1000, 3, 400, flow("b|3", 600, weight=2)) == pytest.approx(8)
    # An idle flow starts at the fair clock.
    assert eta.overtaking_room(1000, 3, 400, flow("b|3", 0)) == pytest.approx(6)
    # A flow already past our tag cannot overtake.
    assert eta.overtaking_room(1000, 3, 400, flow("b|3", 1200)) == 0
    # A class above ours is a lead ahead; one below, a lead behind.
    assert eta.overtaking_room(1000, 3, 400, flow("b|2", 600)) == pytest.approx((400 + lead) / 100)
    assert eta.overtaking_room(1000, 3, 400, flow("b|4", 600), lead) == 0


def test_light_tenants_arriving_meanwhile_are_served_first() -> None:
    """Tenth in line with 4 slots busy and 1 s services: 2.5 s by place. Two other tenants
    each send 1 request/s and can fit 5 requests before its tag: while it waits they take
    half of the fleet, so it waits 5 s; its own flow and a flow past its tag change nothing."""
    averages = eta.ModelAverages(
        service_seconds=1.0,
        virtual_time=500,
        running=4,
        flows=(
            flow("acme/bob|3", 500),
            flow("globex/carol|3", 0),
            flow("acme/alice|3", 1100, rate=9),
            flow("acme/dave|3", 1500, rate=9),
        ),
    )
    alone = eta.queued_eta(10, 4, averages)
    mine = eta.queued_eta(10, 4, averages, start_tag=1000, flow="acme/alice|3")
    assert alone.mid_seconds == pytest.approx(2.5)
    assert mine.mid_seconds == pytest.approx(5.0)


@given(position=st.integers(1, 1000), parallel=slot_counts, start=st.floats(0, 1e6))
def test_a_later_place_never_waits_less(position: int, parallel: int, start: float) -> None:
    averages = eta.ModelAverages(
        service_seconds=2.0,
        virtual_time=1000,
        running=parallel,
        flows=(flow("b|3", 2000, rate=0.5), flow("c|3", 0, rate=3)),
    )
    here = eta.queued_eta(position, parallel, averages, start, "a|3")
    later = eta.queued_eta(position + 1, parallel, averages, start, "a|3")
    assert 0 <= here.min_seconds <= here.max_seconds
    assert later.mid_seconds >= here.mid_seconds


def burst_record(requests: int, seconds: float, started: float, cost: float) -> str:
    """What enqueue.lua keeps for a flow after ``requests`` arrivals over ``seconds``."""
    count, at = 0.0, started
    for i in range(requests):
        arrived = started + seconds * i / max(1, requests - 1)
        count, at = eta.decayed_count(count, at, arrived), arrived
    return f"{count} {at * 1000} {cost} 1"


def test_a_higher_class_burst_is_not_extrapolated_over_the_wait() -> None:
    """A fresh model with 2-second answers on 2 slots; a tenant of a higher class sent 40
    short requests (cost 10 tokens) in 2 s; a normal request is 3rd in line. The burst's
    rate (about 20/s) times the wait would fill the higher class's whole room (its lead:
    20,000 tokens, 2,000 requests): "28-38 minutes". At most the 40 it was seen sending
    are expected ahead: well under two minutes."""
    now = 1002.0
    burst = eta.activity_from_record(
        "acme/batch|2", 400.0, burst_record(40, 2.0, 1000.0, 10), now, 1000.0
    )
    assert burst is not None
    assert burst.seen == pytest.approx(40, rel=0.05)
    averages = eta.ModelAverages(service_seconds=2.0, virtual_time=400, running=2, flows=(burst,))
    unbounded = replace(averages, flows=(replace(burst, seen=math.inf),))
    assert eta.queued_eta(3, 2, unbounded, start_tag=400, flow="acme/alice|3").min_seconds > 1500
    estimate = eta.queued_eta(3, 2, averages, start_tag=400, flow="acme/alice|3")
    assert estimate.max_seconds < 120
    # Place in line (3rd, 2 slots busy, 1 s a completion) and the burst's 40 at most.
    assert estimate.mid_seconds == pytest.approx((2 + 1 + 40) * 1.0, rel=0.05)


flow_activities = st.builds(
    eta.FlowActivity,
    flow=st.sampled_from(["a|1", "b|2", "c|3", "d|4", "e|3"]),
    finish=st.floats(0, 1e6),
    rate=st.floats(0, 1e4),
    cost=st.floats(0, 1e5),
    weight=st.floats(0.01, 100),
    seen=st.floats(0, 1e4),
)


@given(
    position=st.integers(1, 500),
    parallel=slot_counts,
    running=st.integers(0, 64),
    service=st.floats(0.01, 600),
    variance=st.floats(0, 1e4),
    start=st.floats(0, 1e6),
    virtual_time=st.floats(0, 1e6),
    flows=st.lists(flow_activities, max_size=6),
)
def test_the_wait_is_bounded_by_the_place_and_what_others_were_seen_sending(
    position: int,
    parallel: int,
    running: int,
    service: float,
    variance: float,
    start: float,
    virtual_time: float,
    flows: list[eta.FlowActivity],
) -> None:
    """Whatever the rates, rooms and classes: no less than the place in line takes, no
    more than the place plus every other flow's recent arrivals takes (each completion
    service / slots apart), within the range's spread."""
    averages = eta.ModelAverages(
        service_seconds=service,
        service_variance=variance,
        virtual_time=virtual_time,
        running=running,
        flows=tuple(flows),
    )
    estimate = eta.queued_eta(position, parallel, averages, start, "a|3")
    unit = service / parallel
    free = max(0, parallel - running)
    others = sum(f.seen for f in flows if f.flow != "a|3")
    lowest = max(0, position - free) * unit * (1 - averages.spread)
    highest = max(0, position - free + others) * unit * (1 + averages.spread)
    assert 0 <= estimate.min_seconds <= estimate.max_seconds
    assert estimate.min_seconds >= lowest * (1 - 1e-9) - 1e-9
    assert estimate.max_seconds <= highest * (1 + 1e-9) + 1e-9


def test_a_steady_flow_reads_at_its_rate_young_or_old() -> None:
    since = 1000.0
    count, at = 0.0, since
    for i in range(600):  # two per second for five minutes
        count, at = eta.decayed_count(count, at, since + i * 0.5), since + i * 0.5
        if i == 20:
            assert eta.arrival_rate(count, at, at, since) == pytest.approx(2, rel=0.15)
    assert eta.arrival_rate(count, at, at, since) == pytest.approx(2, rel=0.05)
    # Silent for five time constants: nearly nothing is expected from it.
    later = at + 5 * eta.ARRIVAL_TAU_SECONDS
    assert eta.arrival_rate(count, at, later, since) < 2 * math.exp(-5) * 1.05


def test_activity_record_as_enqueue_writes_it() -> None:
    activity = eta.activity_from_record("acme/bob|3", 42.0, "3.5 1000 120 2", 1.0, 0.0)
    assert activity is not None
    assert (activity.flow, activity.finish, activity.cost, activity.weight) == (
        "acme/bob|3",
        42.0,
        120.0,
        2.0,
    )
    assert activity.rate > 0
    assert eta.activity_from_record("x|3", 0.0, "garbage", 1.0, 0.0) is None


async def test_the_store_reads_running_requests_and_active_flows(store: QueueStore) -> None:
    for _ in range(3):
        await store.submit(new_request(user="alice"))
    bob = new_request(user="bob")
    await store.submit(bob)
    lease = await store.claim(MODEL, "d")
    assert lease is not None and lease.request.user == "alice"
    store._averages.clear()
    averages, _ = await store.model_averages(MODEL)
    assert averages.running == 1
    by_flow = {f.flow: f for f in averages.flows}
    assert set(by_flow) == {"acme/alice|3", "acme/bob|3"}
    assert by_flow["acme/alice|3"].rate > by_flow["acme/bob|3"].rate > 0
    assert by_flow["acme/alice|3"].finish > by_flow["acme/bob|3"].finish
    # Bob is next; alice's flow is already past his tag, so only the running one counts.
    stored = await store.inspect(MODEL, bob.id)
    assert stored is not None and stored.position == 1
    estimate = records.eta_for(stored, averages, parallel=1)
    assert estimate is not None
    assert estimate.mid_seconds == pytest.approx(averages.service_seconds)
