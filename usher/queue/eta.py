"""Wait and finish estimates from a model's moving averages, as pure functions.

The scheduler keeps, per model, exponentially weighted moving averages of service time,
its variance, output tokens and tokens/s from completed requests, and per tenant flow how
often it has been sending lately (a decayed count of its arrivals, recorded at enqueue).

A queued request starts once every request served before it has taken a slot. Under fair
queuing those are not only the ones ahead of it in the queue now (its place), but also
later arrivals of other tenants whose start tags fall below its own: a tenant with little
queued can overtake, until its finish tag reaches the request's start tag. So the work
ahead is

    ahead = (place - 1) + sum over other flows of min(room / cost, arrival rate x wait, seen)

where room is how far below the request's tag the flow's next tag would be, and seen is
how many requests the flow sent lately (its decayed count, about the last minute's): a
rate measured during a burst, extrapolated over a long wait, would have a flow that sent
40 requests in two seconds send thousands more (a higher class's room is its lead, 20,000
tokens, so it holds that many), and a 2-second answer read "32-45 minutes". A flow is
expected to send at most again what it was seen sending. The k slots
finish a request every service_time / k seconds on average (M/M/k: a request with n ahead
and every slot busy starts after n + 1 completions), and the wait is the least solution of

    wait = max(0, ahead(wait) - free slots + 1) x service_time / k.

``fair_wait`` solves that exactly (the right side is piecewise linear in the wait). The
range widens with the service time's coefficient of variation, so a model with steady
requests gets a tight "2-3 minutes" and an erratic one an honest wide range.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from usher.queue.fairness import DEFAULT_PRIORITY_LEAD, NORMAL_CLASS

__all__ = [
    "ACTIVE_FLOW_SECONDS",
    "ARRIVAL_TAU_SECONDS",
    "MAX_FLOWS",
    "SERVICE_ALPHA",
    "Estimate",
    "FlowActivity",
    "ModelAverages",
    "activity_from_record",
    "arrival_rate",
    "decayed_count",
    "fair_wait",
    "flow_class",
    "overtaking_room",
    "queued_eta",
    "running_eta",
]

#: The service time's: an ETA multiplies it by the requests ahead, so its noise passes
#: straight into every wait; about the last 40 requests matter (its n-th sample weighs at
#: least 1/n, so a new model's first samples are a plain mean).
SERVICE_ALPHA = 0.05
#: Bounds on the relative half-width of a range.
MIN_SPREAD = 0.15
MAX_SPREAD = 0.75
#: Time constant of a flow's arrival rate: an arrival this long ago counts 1/e of a new one.
ARRIVAL_TAU_SECONDS = 60.0
#: A flow silent this long is no longer expected to send (its decayed count is < 1%).
ACTIVE_FLOW_SECONDS = 5 * ARRIVAL_TAU_SECONDS
#: Shortest observation window a rate is taken over, so a model's first few arrivals do
#: not read as a flood.
MIN_RATE_WINDOW_SECONDS = 2.0
#: At most this many of the most recently active flows are read for an ETA.
MAX_FLOWS = 1000


def decayed_count(
    previous: float,
    previous_at: float,
    now: float,
    tau: float = ARRIVAL_TAU_SECONDS,
) -> float:
    """A flow's decayed arrival count after one more arrival at ``now`` (seconds); what
    enqueue.lua records. Each arrival weighs exp(-age / tau)."""
    return previous * math.exp(-max(0.0, now - previous_at) / tau) + 1.0


def arrival_rate(
    count: float,
    counted_at: float,
    now: float,
    observed_since: float,
    tau: float = ARRIVAL_TAU_SECONDS,
) -> float:
    """Arrivals per second from a decayed count taken at ``counted_at``.

    A steady rate r observed for a window w leaves a count of r * tau * (1 - exp(-w / tau)),
    so dividing by that normalizer is unbiased whether the model is new or long watched.
    """
    if count <= 0:
        return 0.0
    window = max(MIN_RATE_WINDOW_SECONDS, now - observed_since)
    current = count * math.exp(-max(0.0, now - counted_at) / tau)
    return current / (tau * (1 - math.exp(-window / tau)))


def flow_class(flow: str) -> int:
    """The priority class of a flow key ("tenant|class", fairness.flow_key)."""
    _, _, klass = flow.rpartition("|")
    return int(klass) if klass.isdigit() else NORMAL_CLASS


@dataclass(frozen=True, slots=True)
class FlowActivity:
    """One tenant flow as the ETA sees it: where its finish tag stands, how often it has
    been sending, and what its requests typically cost."""

    flow: str
    finish: float
    #: Arrivals per second lately (``arrival_rate``).
    rate: float
    #: Typical token cost of one of its requests (a moving average).
    cost: float
    weight: float = 1.0
    #: Requests it sent lately (its decayed arrival count now): the most it is expected to
    #: put ahead during one wait. Unknown: no bound beyond room and rate.
    seen: float = math.inf


def activity_from_record(
    flow: str, finish: float, record: str, now: float, observed_since: float
) -> FlowActivity | None:
    """A flow's activity from what enqueue.lua keeps ("count at_ms cost weight"); None when
    the record is missing or unreadable. Times in seconds."""
    try:
        count, at_ms, cost, weight = (float(part) for part in record.split())
    except ValueError:
        return None
    rate = arrival_rate(count, at_ms / 1000, now, observed_since)
    seen = max(0.0, count) * math.exp(-max(0.0, now - at_ms / 1000) / ARRIVAL_TAU_SECONDS)
    return FlowActivity(flow, finish, rate, cost, weight, seen)


@dataclass(frozen=True, slots=True)
class ModelAverages:
    """What the scheduler has learned about a model from its completed requests."""

    service_seconds: float
    service_variance: float = 0.0
    output_tokens: float = 256.0
    tokens_per_second: float = 0.0
    #: The queue's fair clock (fairness.py).
    virtual_time: float = 0.0
    #: Requests running now; None when unknown (then every slot counts as busy).
    running: int | None = None
    #: Flows that sent lately, for who may overtake a queued request.
    flows: tuple[FlowActivity, ...] = ()
    priority_lead: float = DEFAULT_PRIORITY_LEAD

    @property
    def spread(self) -> float:
        if self.service_seconds <= 0:
            return MAX_SPREAD
        cv = math.sqrt(max(self.service_variance, 0.0)) / self.service_seconds
        return min(MAX_SPREAD, max(MIN_SPREAD, cv))


@dataclass(frozen=True, slots=True)
class Estimate:
    """A range in seconds, min <= max."""

    min_seconds: float
    max_seconds: float

    @property
    def mid_seconds(self) -> float:
        return (self.min_seconds + self.max_seconds) / 2


def overtaking_room(
    start_tag: float,
    klass: int,
    virtual_time: float,
    flow: FlowActivity,
    lead: float = DEFAULT_PRIORITY_LEAD,
) -> float:
    """How many more requests ``flow`` can be expected to queue ahead of a request with
    ``start_tag`` in ``klass``: its next request's score is max(virtual time, its finish
    tag) plus the class lead, and each one moves its finish tag on by about cost / weight
    (costs are estimates settled later, so the count is a mean, not a whole number)."""
    ours = start_tag + lead * (klass - 1)
    theirs = max(virtual_time, flow.finish) + lead * (flow_class(flow.flow) - 1)
    step = max(flow.cost, 1.0) / max(flow.weight, 1e-9)
    return max(0.0, ours - theirs) / step


def fair_wait(
    ahead: float,
    free_slots: int,
    slots: int,
    service_seconds: float,
    competitors: Iterable[tuple[float, float]] = (),
) -> float:
    """Seconds until a request with ``ahead`` requests before it takes a slot.

    ``competitors`` are (room, rate) pairs: a flow that can still put ``room`` requests ahead
    and sends ``rate`` per second. The answer is the least wait T >= 0 with
    T = max(0, ahead + sum(min(room, rate * T)) - free_slots + 1) * service_seconds / slots.
    """
    unit = max(service_seconds, 0.0) / max(1, slots)
    base = ahead - free_slots + 1
    if base <= 0 or unit == 0:
        return 0.0
    # Between consecutive "flow is full" times (room / rate) the right side is linear in T:
    # (base + rooms of full flows + T * rates of the others) * unit. The first segment whose
    # line crosses T = T holds the least fixed point.
    pending: Sequence[tuple[float, float]] = sorted(
        ((room, rate) for room, rate in competitors if room > 0 and rate > 0),
        key=lambda c: c[0] / c[1],
    )
    filled = 0.0
    for index in range(len(pending) + 1):
        rate = sum(r for _, r in pending[index:])
        slope = rate * unit
        if slope < 1:
            wait = (base + filled) * unit / (1 - slope)
            if index == len(pending) or wait <= pending[index][0] / pending[index][1]:
                return wait
        if index < len(pending):
            filled += pending[index][0]
    raise AssertionError("unreachable: the last segment is flat")


def queued_eta(
    position: int,
    parallel: int,
    averages: ModelAverages,
    start_tag: float | None = None,
    flow: str = "",
) -> Estimate:
    """Time until a request at 1-based ``position`` starts, with ``parallel`` slots serving.

    With the request's ``start_tag`` and ``flow``, other flows' expected arrivals that fair
    queuing will serve first count too (each at most what it was seen sending lately);
    without them, the place in line alone.
    """
    if position < 1:
        raise ValueError("position is 1-based")
    slots = max(1, parallel)
    free = 0 if averages.running is None else max(0, slots - averages.running)
    competitors: list[tuple[float, float]] = []
    if start_tag is not None:
        klass = flow_class(flow) if flow else NORMAL_CLASS
        competitors = [
            (
                min(
                    other.seen,
                    overtaking_room(
                        start_tag, klass, averages.virtual_time, other, averages.priority_lead
                    ),
                ),
                other.rate,
            )
            for other in averages.flows
            if other.flow != flow
        ]
    expected = fair_wait(position - 1, free, slots, averages.service_seconds, competitors)
    spread = averages.spread
    return Estimate(expected * (1 - spread), expected * (1 + spread))


def running_eta(tokens_so_far: int, averages: ModelAverages, expected_output: float) -> Estimate:
    """Time until a running request finishes, from its progress and the model's speed."""
    remaining_tokens = max(0.0, expected_output - tokens_so_far)
    if averages.tokens_per_second > 0:
        expected = remaining_tokens / averages.tokens_per_second
    else:
        expected = averages.service_seconds * (remaining_tokens / max(expected_output, 1.0))
    spread = averages.spread
    return Estimate(expected * (1 - spread), expected * (1 + spread))
