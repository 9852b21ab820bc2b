"""Anticipatory idling: a freed slot waits a moment for the flow whose answer freed it.

A tenant that asks, reads the answer and asks again (a chat, an agent's loop) has nothing
queued in the few milliseconds between its answer and its next request. Under a flood the
slot its answer freed is claimed for the flood's next request in that gap, and with equal
generation times the slots stay in step: the light tenant then waits most of a generation
for every request although it is far below its fair share. Linux's CFQ disk scheduler met
the same pattern (a process reading a file block after block) and idled the disk for a
short ``slice_idle`` after a request completed, for the process whose think time had been
short; this does the same for slots:

- after a flow's answer, with nothing else of that flow queued, other requests waiting, the
  flow holding no more than its share of the model's slots in service (split between the
  flows running or waiting), and its recent think time (answer → its next request, a
  moving average of samples capped as CFQ caps them) within the window, the next slot
  granted for that model here is held for the flow;
- a request of the flow arriving within the window is claimed on it at once (ahead of the
  fair order: claim.lua's first request), else the slot goes to the fair head when the
  window passes. A flow that does not come back quickly is never waited for.

``idle_seconds`` and ``think_sample`` are the decision, pure; ``Anticipation`` is the
in-process state one dispatcher keeps (per replica: a request submitted through another
replica does not end a hold here, which then just runs out).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
from dataclasses import dataclass

from usher.queue.fairness import flow_class
from usher.smoothing import ewma

__all__ = ["AnswerSeen", "Anticipation", "idle_seconds", "think_sample"]

#: A flow's think time is forgotten this long after it was last seen here.
FORGET_SECONDS = 300.0
#: Forgotten flows are swept once every this many answers.
SWEEP_EVERY = 1024
#: A model's slots in service here are the most of its requests running here at once
#: within about this long.
PEAK_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class AnswerSeen:
    """What a dispatcher knows of a model when one flow's answer is done."""

    #: The flow has another request queued.
    flow_queued: bool
    #: Requests are queued for the model (another flow's, when the flow has none).
    others_queued: bool
    #: A flow of a higher priority class than this one's has requests queued.
    higher_class_queued: bool
    #: The flow's requests running here, the answered one included.
    flow_running: int
    #: The model's slots in service here: the most of its requests running here at once
    #: lately (at an answer some slots are between requests), the answered one included.
    model_running: int
    #: Distinct flows with requests running here or queued through here, the answered
    #: one's included.
    flows_active: int
    #: The flow's think time (moving average, seconds); None until measured once.
    think_seconds: float | None


def idle_seconds(seen: AnswerSeen, window: float) -> float:
    """How long the slot the answer freed is held for its flow (0: not at all)."""
    if window <= 0 or seen.flow_queued or not seen.others_queued:
        return 0.0  # off, nothing to anticipate, or no one else to keep the slot from
    if seen.higher_class_queued:
        return 0.0  # a hold claims ahead of the queue's order, priority included
    if seen.think_seconds is None or seen.think_seconds > window:
        return 0.0  # the flow does not come back within the window
    # Its share: the slots in service split between the active flows (at least two:
    # someone else is waiting). A flow holding more than that is not idled for, nor is one
    # when more flows wait than there are slots (each has less than a slot's share).
    flows = max(seen.flows_active, 2)
    if seen.flow_running * flows > seen.model_running:
        return 0.0
    return window


def think_sample(gap_seconds: float, window: float) -> float:
    """One think-time sample: the gap between a flow's answer and its next request, capped
    at twice the window (as CFQ caps it) so that one long pause does not keep a flow that
    is quick again from being idled for through many requests."""
    return min(max(gap_seconds, 0.0), 2 * window)


@dataclass(slots=True)
class _Flow:
    #: Its think time, a moving average in seconds (None until measured).
    think: float | None = None
    #: When its last answer was done with nothing of it queued (None: not since).
    answered_at: float | None = None
    seen_at: float = 0.0


@dataclass(slots=True)
class _Hold:
    model: str
    flow: str
    until: float
    #: Resolves to the id of the flow's request when it arrives.
    arrived: asyncio.Future[str]


class Anticipation:
    """One dispatcher's holds, and what it knows of the flows it serves."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._flows: dict[str, _Flow] = {}
        #: model → flow → ids of its requests running here (claimed, not answered yet).
        self._running: dict[str, dict[str, set[str]]] = {}
        #: model → flow → (its newest request queued through here and not claimed here
        #: yet, when it was queued). A flow's requests are claimed in the order they came,
        #: so the flow has nothing queued once that one is claimed. One cancelled or
        #: claimed elsewhere stays until the flow's next request, or the sweep: meanwhile
        #: the flow counts as waiting, which only makes holds rarer.
        self._waiting: dict[str, dict[str, tuple[str, float]]] = {}
        #: model → holds armed and not yet taken by a slot, oldest first.
        self._armed: dict[str, collections.deque[_Hold]] = {}
        #: (model, flow) → its hold, armed or taken, until it ends.
        self._holds: dict[tuple[str, str], _Hold] = {}
        self._answers = 0
        #: model → (most of its requests running here at once lately, since when).
        self._peak: dict[str, tuple[int, float]] = {}

    def arrived(self, model: str, flow: str, request_id: str) -> None:
        """A request of ``flow`` was queued through this replica."""
        now = _now()
        state = self._flows.setdefault(flow, _Flow())
        if state.answered_at is not None:
            sample = think_sample(now - state.answered_at, self.window)
            state.think = ewma(state.think, sample)
            state.answered_at = None
        state.seen_at = now
        # A request a loop here claimed before its enqueue's answer came back (a claim
        # that ran beside the Submit) is running, not waiting; a slot held for its flow is
        # then free for the fair order at once rather than idle until the hold runs out.
        if request_id not in self._running.get(model, {}).get(flow, ()):
            self._waiting.setdefault(model, {})[flow] = (request_id, now)
        hold = self._holds.get((model, flow))
        if hold is not None and not hold.arrived.done():
            hold.arrived.set_result(request_id)

    def started(self, model: str, flow: str, request_id: str) -> None:
        """A request was claimed here."""
        flows = self._running.setdefault(model, {})
        flows.setdefault(flow, set()).add(request_id)
        now = _now()
        running = self.running(model)
        peak, since = self._peak.get(model, (0, now))
        if running >= peak or now - since > PEAK_SECONDS:
            self._peak[model] = (running, now)
        waiting = self._waiting.get(model, {})
        if waiting.get(flow, ("", 0.0))[0] == request_id:
            del waiting[flow]
            if not waiting:
                del self._waiting[model]

    def ended(self, model: str, flow: str, request_id: str) -> None:
        """A request claimed here was answered or ended (whatever its outcome; told
        twice, the second changes nothing)."""
        flows = self._running.get(model, {})
        ids = flows.get(flow)
        if ids is not None:
            ids.discard(request_id)
            if not ids:
                del flows[flow]
        if not flows:
            self._running.pop(model, None)

    def running(self, model: str) -> int:
        """Requests of ``model`` claimed here and not answered (or ended) yet."""
        return sum(len(ids) for ids in self._running.get(model, {}).values())

    def answered(self, model: str, flow: str, request_id: str, others_queued: bool) -> None:
        """A request's answer is done (its slot is freed now): hold the next slot granted
        for ``model`` for its flow, when ``idle_seconds`` says so."""
        now = _now()
        state = self._flows.setdefault(flow, _Flow())
        state.seen_at = now
        running = self._running.get(model, {})
        mine = running.get(flow, set())
        waiting = self._waiting.get(model, {})
        flow_queued = flow in waiting
        klass = flow_class(flow)
        seen = AnswerSeen(
            flow_queued=flow_queued,
            others_queued=others_queued,
            higher_class_queued=any(flow_class(other) < klass for other in waiting),
            flow_running=len(mine | {request_id}),
            model_running=max(
                self.running(model) + (request_id not in mine),
                self._peak.get(model, (0, now))[0],
            ),
            flows_active=len(running.keys() | waiting.keys() | {flow}),
            think_seconds=state.think,
        )
        if not flow_queued:
            state.answered_at = now
        seconds = idle_seconds(seen, self.window)
        earlier = self._holds.get((model, flow))
        if earlier is not None and earlier.until <= now:  # ran out with no slot granted
            with contextlib.suppress(ValueError):
                self._armed.get(model, collections.deque()).remove(earlier)
            self._end(earlier)
            earlier = None
        if seconds > 0 and earlier is None:
            hold = _Hold(model, flow, now + seconds, asyncio.get_running_loop().create_future())
            self._holds[(model, flow)] = hold
            self._armed.setdefault(model, collections.deque()).append(hold)
        self._answers += 1
        if self._answers % SWEEP_EVERY == 0:
            self._sweep(now)

    def holding_for(self, model: str) -> list[str]:
        """The flows the next slots of ``model`` are held for, oldest first."""
        now = _now()
        return [hold.flow for hold in self._armed.get(model, ()) if hold.until > now]

    async def first_claim(self, model: str) -> str | None:
        """Called with a slot for ``model`` in hand, before claiming: the id of the request
        to claim on it ahead of the fair order. With a hold armed for the model, waits for
        its flow's request until the hold runs out ('': it did; None: no hold)."""
        armed = self._armed.get(model)
        now = _now()
        while armed:
            hold = armed.popleft()
            if hold.until > now or hold.arrived.done():
                break
            self._end(hold)
        else:
            self._armed.pop(model, None)
            return None
        if not armed:
            self._armed.pop(model, None)
        try:
            if not hold.arrived.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(hold.arrived), hold.until - now)
            return hold.arrived.result() if hold.arrived.done() else ""
        finally:
            self._end(hold)

    def _end(self, hold: _Hold) -> None:
        if self._holds.get((hold.model, hold.flow)) is hold:
            del self._holds[(hold.model, hold.flow)]
        if not hold.arrived.done():
            hold.arrived.cancel()
            # Ran out: a think time as long as a sample can be (the request, when it comes,
            # is not sampled again). A flow whose requests go through other replicas, or
            # that stopped, is soon not waited for.
            state = self._flows.get(hold.flow)
            if state is not None and state.answered_at is not None:
                state.think = ewma(state.think, think_sample(math.inf, self.window))
                state.answered_at = None

    def _sweep(self, now: float) -> None:
        running = {flow for flows in self._running.values() for flow in flows}
        for flow in [f for f, s in self._flows.items() if now - s.seen_at > FORGET_SECONDS]:
            if flow not in running:
                del self._flows[flow]
        for model, waiting in list(self._waiting.items()):
            for flow in [f for f, (_, at) in waiting.items() if now - at > FORGET_SECONDS]:
                del waiting[flow]
            if not waiting:
                del self._waiting[model]


def _now() -> float:
    return asyncio.get_running_loop().time()
