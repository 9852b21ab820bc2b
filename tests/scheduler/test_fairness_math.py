"""Properties of the pure fairness and ETA math (usher/queue/fairness.py, eta.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from usher import smoothing
from usher.queue import eta, fairness
from usher.queue.fairness import FairQueue

costs = st.floats(min_value=1, max_value=4000, allow_nan=False)
weights = st.floats(min_value=0.1, max_value=10, allow_nan=False)
classes = st.integers(min_value=1, max_value=5)


@given(vtime=st.floats(0, 1e9), flow=st.floats(0, 1e9), cost=costs, weight=weights, klass=classes)
def test_tags_start_no_earlier_than_vtime_or_flow(
    vtime: float, flow: float, cost: float, weight: float, klass: int
) -> None:
    tags = fairness.enqueue_tags(vtime, flow, cost, weight, klass)
    assert tags.start == max(vtime, flow)
    assert tags.finish == pytest.approx(tags.start + cost / weight)
    assert tags.score >= tags.start


def test_zero_weight_is_refused() -> None:
    with pytest.raises(ValueError, match="weight"):
        fairness.enqueue_tags(0, 0, 1, 0, 3)


@given(st.lists(st.tuples(st.sampled_from("abc"), costs), min_size=20, max_size=120))
def test_backlogged_equal_tenants_get_equal_service(arrivals: list[tuple[str, float]]) -> None:
    """SFQ's guarantee: while two flows stay backlogged, their served work differs by at most
    one maximum request cost (per unit weight)."""
    queue = FairQueue()
    for tenant, cost in arrivals:
        queue.push(tenant, cost)
    served: dict[str, float] = dict.fromkeys("abc", 0.0)
    backlog = {t: sum(c for x, c in arrivals if x == t) for t in "abc"}
    max_cost = max(c for _, c in arrivals)
    while len(queue):
        item = queue.pop()
        served[item.tenant] += item.cost
        busy = [t for t in "abc" if served[t] < backlog[t]]
        for x in busy:
            for y in busy:
                assert served[x] - served[y] <= 2 * max_cost + 1e-6


@given(
    heavy=st.integers(min_value=1, max_value=4),
    backlog=st.integers(min_value=5, max_value=60),
    cost=costs,
)
def test_a_light_tenant_waits_behind_at_most_one_request_per_heavy_tenant(
    heavy: int, backlog: int, cost: float
) -> None:
    queue = FairQueue()
    for i in range(backlog):
        for h in range(heavy):
            queue.push(f"heavy{h}", cost * (1 + i % 3))
    for _ in range(backlog // 2):
        queue.pop()
    light = queue.push("light", cost)
    assert queue.position(light) <= heavy + 1


@given(
    highs=st.integers(min_value=1, max_value=400),
    cost=st.floats(min_value=10, max_value=2000),
    lead=st.floats(min_value=100, max_value=50_000),
)
def test_low_priority_ages_past_later_high_priority_work(
    highs: int, cost: float, lead: float
) -> None:
    """A low request is served once ``2 * lead`` of later high-class work has been served:
    however long the stream of high requests, it never starves."""
    queue = FairQueue(lead=lead)
    low = queue.push("batch", cost, klass=4)
    served_high = 0.0
    for i in range(highs):
        queue.push(f"interactive{i % 5}", cost, klass=2)
        item = queue.pop()
        if item is low:
            break
        served_high += item.cost
    else:
        while len(queue):
            item = queue.pop()
            if item is low:
                break
            served_high += item.cost
    # Five high flows share service, so the low request's tag is reached after at most
    # 2 * lead of virtual time, i.e. 5 * 2 * lead of tokens plus one request per flow.
    assert served_high <= 5 * (2 * lead + cost) + 1e-6


def test_priority_goes_first_among_contemporaries() -> None:
    queue = FairQueue()
    low = queue.push("a", 100, klass=4)
    normal = queue.push("b", 100, klass=3)
    critical = queue.push("c", 100, klass=1)
    assert [queue.pop(), queue.pop(), queue.pop()] == [critical, normal, low]


def test_weights_share_service_in_proportion() -> None:
    queue = FairQueue(weights={"gold": 3.0, "bronze": 1.0})
    for _ in range(40):
        queue.push("gold", 100)
        queue.push("bronze", 100)
    first = [queue.pop().tenant for _ in range(40)]
    assert first.count("gold") == 30


def test_corrected_finish_settles_the_estimate() -> None:
    assert fairness.corrected_finish(1000, estimated=300, actual=500, weight=2) == 1100
    assert fairness.estimate_cost(100, 256, num_predict=50) == 150
    assert fairness.estimate_cost(100, 256, num_predict=None) == 356


@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), costs, st.floats(0.0, 1.0)),
        min_size=2,
        max_size=60,
    )
)
def test_settling_cheaper_answers_never_reorders_a_flow(
    requests: list[tuple[str, float, float]],
) -> None:
    """Each tenant's requests leave in the order they came, however much (or little) the
    answers actually cost: a finish tag settled down must not let a later request in ahead."""
    queue = FairQueue()
    sent: dict[str, list[int]] = {}
    served: dict[str, list[int]] = {}
    for n, (tenant, cost, share) in enumerate(requests):
        item = queue.push(tenant, cost)
        sent.setdefault(tenant, []).append(item.seq)
        if n % 2:  # interleave arrivals with completions that cost a fraction of the guess
            done = queue.pop()
            served.setdefault(done.tenant, []).append(done.seq)
            queue.settle(done, done.cost * share)
    while queue._heap:
        done = queue.pop()
        served.setdefault(done.tenant, []).append(done.seq)
    assert served == sent


def test_a_settled_finish_stays_at_or_above_the_newest_start() -> None:
    assert fairness.corrected_finish(1000, 300, 0, 1, last_start=900) == 900
    assert fairness.corrected_finish(1000, 300, 100, 1, last_start=500) == 800


positions = st.integers(min_value=1, max_value=10_000)
slots = st.integers(min_value=1, max_value=64)
averages = st.builds(
    eta.ModelAverages,
    service_seconds=st.floats(0.01, 3600),
    service_variance=st.floats(0, 1e6),
)


@given(position=positions, parallel=slots, model=averages)
def test_eta_range_is_ordered_and_grows_with_position(
    position: int, parallel: int, model: eta.ModelAverages
) -> None:
    here = eta.queued_eta(position, parallel, model)
    later = eta.queued_eta(position + 1, parallel, model)
    assert 0 <= here.min_seconds <= here.max_seconds
    assert later.mid_seconds >= here.mid_seconds
    assert eta.queued_eta(position, parallel + 1, model).mid_seconds <= here.mid_seconds + 1e-9


def test_eta_of_third_in_line_with_one_slot() -> None:
    """Two ahead and one running: it starts after three services."""
    estimate = eta.queued_eta(3, 1, eta.ModelAverages(service_seconds=60, service_variance=0))
    assert estimate.mid_seconds == pytest.approx(180)
    assert estimate.min_seconds == pytest.approx(180 * 0.85)


@given(st.lists(st.floats(0.1, 100), min_size=2, max_size=50))
@settings(max_examples=50)
def test_ewma_stays_within_the_samples(samples: list[float]) -> None:
    mean: float | None = None
    var: float | None = None
    for sample in samples:
        var = smoothing.ewma_variance(var, mean, sample)
        mean = smoothing.ewma(mean, sample)
    assert mean is not None and var is not None
    assert min(samples) - 1e-9 <= mean <= max(samples) + 1e-9
    assert var >= 0
