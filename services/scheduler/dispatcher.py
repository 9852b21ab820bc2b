"""Dispatchers: the loops in every scheduler replica that move requests from queue to model.

Each loop waits for the Pool to grant a slot (Reserve, a long poll) for a model that has
queued work, claims that model's next request in fair order under a lease, runs it through
Pool.Generate, appends its tokens to the request's event stream, and finishes it. A
heartbeat keeps the lease and carries cancellation: a cancel seen there (or a lost lease)
closes the Generate stream, which stops the model server.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, cast

import grpc
from opentelemetry import trace
from opentelemetry.trace import Span

from services.scheduler.anticipation import Anticipation
from services.scheduler.fleet import DEFAULT_LOOPS, external_loop, loops_for_fleet
from services.scheduler.progress import ProgressBuffer, ProgressWriter
from services.scheduler.quotas import Footprint, Quotas
from services.scheduler.store import (
    FinishedWork,
    Lease,
    NewRequest,
    QueueStore,
    SubmitOutcome,
)
from usher import keys, metrics, tracing
from usher.background import Background
from usher.backoff import exponential_backoff
from usher.keys import ModelKeys
from usher.logs import get_logger
from usher.queue.fairness import flow_key, priority_class
from usher.queue.reads import now_ms
from usher.queue.records import StoredRequest
from usher.scripts import ScriptCall
from usher.structs import duration_from_seconds
from usher.tls import ClientTls, open_channel
from usher.v1 import pool_pb2, pool_pb2_grpc, request_pb2, scheduler_pb2
from usher.waiters import Waiters

__all__ = ["DispatchSettings", "Dispatcher", "Expected"]

log = get_logger(__name__)

#: How often a replica looks for work queued through other replicas (or handed back by the
#: reaper) while there was work lately; with none, the look slows down, doubling up to
#: IDLE_POLL_MAX_SECONDS, until a submit here or work found brings it back.
IDLE_POLL_SECONDS = 0.05
IDLE_POLL_MAX_SECONDS = 0.5
#: The model set is read again at most this often (it grows when a model first queues).
MODELS_CACHE_SECONDS = 1.0
#: How long a request's ending waits for its heartbeat to stop (it stops within a turn).
HEARTBEAT_STOP_SECONDS = 5.0
#: How much longer than a request's run-time limit the dispatcher waits for the Pool to end it.
RUN_LIMIT_MARGIN_SECONDS = 10.0
#: How often a replica following its fleet asks the Pool for the fleet's slots; after a
#: failed ask (the Pool not up yet), FLEET_RETRY_SECONDS.
FLEET_REFRESH_SECONDS = 5.0
FLEET_RETRY_SECONDS = 1.0
#: Longest an idle loop sleeps unwoken (a safety net: work wakes loops one at a time).
IDLE_REST_SECONDS = 1.0
#: A loop whose slot the Pool kept after an answer, with nothing of its model queued, waits
#: this long for the model's next request (a client asking again comes within moments)
#: before giving the slot back: under a steady load each request then skips a Reserve and
#: a Release, two calls and their slot scripts.
KEEP_SLOT_SECONDS = 0.5
#: Longest a loop holding a slot waits for an expected Submit before it looks again (a
#: safety net: the Submit's end wakes it).
PARK_SECONDS = 1.0
#: Longest a Submit's enqueue waits for a loop's Reserve made for it (a safety net: that
#: Reserve asks for a slot free now, one round trip).
LANDING_SECONDS = 0.1
#: Longest a Submit's enqueue waits for a loop holding a slot kept for its model to park
#: with it (the loop is finishing its last answer's writes, or waking: a round trip or a few
#: loop turns away), so the claim rides the enqueue instead of following it.
KEPT_LANDING_SECONDS = 0.005
COMPLETED = request_pb2.REQUEST_STATE_COMPLETED
FAILED = request_pb2.REQUEST_STATE_FAILED
CANCELLED = request_pb2.REQUEST_STATE_CANCELLED


@dataclass(frozen=True, slots=True)
class DispatchSettings:
    pool_address: str
    service_token: str
    #: Requests this replica runs at once (across models); None: a loop for each slot of
    #: the fleet, as the Pool lists it (fleet.py).
    concurrency: int | None = None
    reserve_wait_seconds: float = 5.0
    #: Tokens are appended to a request's stream at most this often, batched.
    token_flush_seconds: float = 0.05
    #: On shutdown, how long running requests may take to finish before they are handed
    #: back to the queue (at their original place) for another replica.
    drain_seconds: float = 8.0
    #: A failed attempt waits this long (doubling per attempt, jittered, up to the maximum)
    #: before it goes back to the queue: a failing fleet is not hammered.
    retry_backoff_seconds: float = 1.0
    retry_backoff_max_seconds: float = 30.0
    #: After a flow's answer, the next slot of its model is held this long for the flow's
    #: next request when it has been coming back that fast (anticipation.py); 0 = never.
    idle_seconds: float = 0.025
    #: How long a slot kept after an answer waits for its model's next request.
    keep_slot_seconds: float = KEEP_SLOT_SECONDS


class _Cancelled(Exception):
    """The request was cancelled or its lease lost while running."""

    def __init__(self, lost: bool) -> None:
        super().__init__("lease lost" if lost else "cancelled")
        self.lost = lost


@dataclass(slots=True)
class _KeptSlot:
    """The slot the Pool kept for one dispatcher loop after its last answer, for the next
    request of the same model (GenerationDone.slot_kept); None when it holds none."""

    slot: pool_pb2.Slot | None = None
    #: The loop counts as reserving (not while it waits for its model's next request).
    counted: bool = False


#: What a parked loop is told to do: claim on its own (the Submit's claim did not run).
_CLAIM = False
#: The longest prompt (estimated tokens) a request may have to start early (``_start_early``):
#: an early start its enqueue then refuses (a tenant over its limits) costs the model server
#: no more than reading this much.
EARLY_START_MAX_PROMPT_TOKENS = 2048
#: The consumer span of a request's run, in the trace its enqueue stored.
DISPATCH_SPAN = "usher.dispatch"


def _dispatch_attributes(request_id: str, slot: pool_pb2.Slot) -> dict[str, str]:
    return {
        "messaging.system": "redis",
        "usher.model": slot.model,
        "usher.request_id": request_id,
        "usher.instance": slot.instance,
    }


@dataclass(frozen=True, slots=True)
class _Holding:
    """The slot a parked loop holds, as its Generate would use it."""

    slot: pool_pb2.Slot
    #: Kept after the loop's last answer (the Generate asks to run on it again).
    reused: bool
    #: The loop can keep the slot after this answer (it has a _KeptSlot).
    keeping: bool


@dataclass(slots=True, eq=False)
class _Parked:
    """A loop holding a slot of a model, waiting for a Submit expected here (``expect``).
    Taken by a Submit, it is handed the claim that rode the enqueue: a lease, None (nothing
    to claim) or _CLAIM; untaken, _CLAIM wakes it to look again."""

    handed: asyncio.Future[Lease | bool | None]
    taken: bool = False
    holding: _Holding | None = None


class _Primed:
    """A streamed Generate whose first message is asked for at once: the call (a gRPC one,
    or the in-process Pool's, which runs only when read) then reaches the model server now.
    Read on as the call itself; ``cancel`` ends both."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._messages = call.__aiter__()
        self._first: asyncio.Future[Any] | None = asyncio.ensure_future(self._messages.__anext__())
        # A first message never read (cancelled early start): its outcome is nobody's.
        self._first.add_done_callback(_ignore_outcome)

    def __aiter__(self) -> _Primed:
        return self

    async def __anext__(self) -> Any:
        first, self._first = self._first, None
        if first is not None:
            return await first
        return await self._messages.__anext__()

    def cancel(self) -> bool:
        if self._first is not None:
            self._first.cancel()
        return bool(self._call.cancel())


def _ignore_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


@dataclass(frozen=True, slots=True)
class _EarlyStart:
    """A request's Generate sent on its parked loop's slot beside its enqueue (the model
    server works while the enqueue's round trip is under way), not yet known to be its own."""

    #: GenerateWhole's answer, or the streamed Generate, its first message asked for.
    call: asyncio.Future[Any] | _Primed
    #: When it was sent (monotonic), for the answer's service time.
    at: float
    #: Its ``usher.dispatch`` span, under which the Generate went: its loop's once the
    #: claim says the request is its own, ended at once if not.
    span: Span

    @property
    def whole(self) -> bool:
        """The answer is awaited whole (GenerateWhole), not streamed."""
        return isinstance(self.call, asyncio.Future)


class Expected:
    """A Submit on its way to the queue through this replica (``Dispatcher.expect``): its
    enqueue goes through ``enqueue``, and ``end`` (when it ends otherwise; a no-op after
    the enqueue) says no request comes of it."""

    __slots__ = ("_dispatcher", "_open", "await_end", "ended", "model")

    def __init__(self, dispatcher: Dispatcher, model: str) -> None:
        self._dispatcher = dispatcher
        self.model = model
        self._open = True
        #: The Submit waits for the end of its request should it start here at once...
        self.await_end = False
        #: ...and then this tells it: the request as it ended, or None when it ended
        #: otherwise here (failed, cancelled, given back, its lease lost).
        self.ended: asyncio.Future[StoredRequest | None] | None = None

    async def enqueue(
        self, request: NewRequest, admission: ScriptCall | None = None, await_end: bool = False
    ) -> SubmitOutcome:
        """Queue ``request`` (``QueueStore.submit``, ``admission`` riding along): a loop
        already holding a slot of its model claims beside the enqueue, in the same round
        trip. With ``await_end``, ``ended`` is set when that claim took this request."""
        self.await_end = await_end
        return await self._dispatcher.enqueue(self, request, admission)

    def forget_end(self, request_id: str) -> None:
        """The end of the request is not waited for (any more)."""
        if self.ended is not None:
            self._dispatcher.forget_end(request_id)

    def end(self, parked: _Parked | None = None) -> bool:
        """The expectation is over (``parked``: the loop its claim went to); False when it
        already was."""
        if not self._open:
            return False
        self._open = False
        self._dispatcher.expectation_ended(self.model, parked)
        return True


class Dispatcher:
    def __init__(
        self,
        store: QueueStore,
        quotas: Quotas,
        settings: DispatchSettings,
        pool: pool_pb2_grpc.PoolServiceAsyncStub | None = None,
    ) -> None:
        self.store = store
        self.quotas = quotas
        self.settings = settings
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        self._metadata = (("authorization", f"Bearer {settings.service_token}"),)
        #: A gRPC channel to the Pool, unless given the Pool's stub (usher serve: in process).
        self._channel: grpc.aio.Channel | None = None
        if pool is None:
            self._channel = open_channel(
                settings.pool_address, ClientTls.from_env(), tracing.client_interceptors()
            )
            pool = pool_pb2_grpc.PoolServiceStub(self._channel)
        self._pool = pool
        self.progress = ProgressWriter(store)
        #: Queued requests per model (local lane, external lane) as this replica believes:
        #: read by the poll, moved by submits here and by this replica's claims, so a
        #: dispatcher loop needs no Redis read to know whether to reserve a slot.
        self._demand: tuple[dict[str, int], dict[str, int]] = ({}, {})
        self._models: tuple[float, list[str]] = (-math.inf, [])
        #: Something was queued or claimed here since the last poll.
        self._active = False
        #: Changes to the demand made while a read of it is under way, applied to what the
        #: read finds (else a claim made meanwhile would count again and wake a loop for it).
        self._changes_during_read: list[tuple[str, bool, int | None]] | None = None
        #: Loops reserving a slot and claiming now, local and external: never more than
        #: there is work.
        self._reserving = {False: 0, True: 0}
        #: Request id → event that wakes its heartbeat (set when its cancel is announced).
        self._cancel_nudges: dict[str, asyncio.Event] = {}
        #: Requests whose heartbeat has a Redis call under way.
        self._beating: set[str] = set()
        self._demand_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        #: Idle loops, local and external, each parked on a future. Work wakes one loop,
        #: and a loop that finds more work than loops reserving wakes the next: a chain,
        #: not a herd of every idle loop waking for each request.
        self._idle: dict[bool, Waiters[None]] = {False: Waiters(), True: Waiters()}
        #: Loops holding a kept slot, waiting for the next request of its model (model →
        #: their futures, the latest last): work of the model wakes the latest first, so
        #: the slots a load needs stay in use and the others' waits run out.
        self._kept_waiting: dict[str, list[asyncio.Future[bool]]] = {}
        self._anticipation = Anticipation(settings.idle_seconds)
        #: model → Submits through this replica admitted or being admitted and not queued
        #: yet (``expect``): counted as work, so a loop reserves a slot beside them.
        self._expected: dict[str, int] = {}
        #: model → loops holding a slot of it and waiting for an expected Submit, oldest first.
        self._parked: dict[str, collections.deque[_Parked]] = {}
        #: model → (when its last Submit through here arrived, the gap before that one):
        #: a slot is kept after an answer when its model's requests come that often.
        self._arrivals: dict[str, tuple[float, float]] = {}
        #: Loops whose Reserve for expected Submits is under way, and the enqueues waiting
        #: (by model) for a loop to land with a slot: one of those, or a loop holding a kept
        #: slot parking. Its slot can take their claim along.
        self._speculating = 0
        self._landings: Waiters[str] = Waiters()
        #: model → loops holding a slot the Pool kept for it after their last answer.
        self._kept_slots: dict[str, int] = {}
        #: Request id → the Submit waiting here for its end (``await_end``).
        self._awaited: dict[str, asyncio.Future[StoredRequest | None]] = {}
        #: Claims of the local lane on their way to Redis, by model: requests queued that
        #: a loop is already going for.
        self._claiming: collections.Counter[str] = collections.Counter()
        #: Requests whose Generate went out beside their enqueue and that their claim took:
        #: the loop handed the lease runs on with it (``run_request``).
        self._early: dict[str, _EarlyStart] = {}
        self._background = Background()
        #: Dispatch loops by index, and how many are wanted (``resize``).
        self._loops: dict[int, asyncio.Task[None]] = {}
        self._loops_wanted = 0

    async def aclose(self) -> None:
        for early in self._early.values():  # handed to loops that stopped before running
            early.call.cancel()
            early.span.end()
        self._early.clear()
        if self._channel is not None:
            await self._channel.close()

    async def models_with_work(self) -> tuple[dict[str, int], dict[str, int]]:
        """Queued requests per model, local and waiting for the external provider, read
        from Redis now (one read at a time per replica, however many ask)."""
        async with self._demand_lock:
            at, models = self._models
            if time.monotonic() - at > MODELS_CACHE_SECONDS:
                raw = cast(set[bytes], await self.store.redis.smembers(keys.MODELS))
                models = sorted(m.decode() for m in raw)
                self._models = (time.monotonic(), models)
            # A model first queued here since the set was read is read too (its count is
            # not to be lost to a set read before it joined).
            models = sorted({*models, *self._demand[0], *self._demand[1]})
            self._changes_during_read = []
            try:
                async with self.store.redis.pipeline(transaction=False) as pipe:
                    for model in models:
                        pipe.zcard(ModelKeys(model).queue)
                        pipe.zcard(ModelKeys(model).external)
                    counts = cast(list[int], await pipe.execute())
                local = {m: int(counts[2 * i]) for i, m in enumerate(models) if counts[2 * i]}
                external = {
                    m: int(counts[2 * i + 1]) for i, m in enumerate(models) if counts[2 * i + 1]
                }
                self._demand = (local, external)
            finally:
                changes, self._changes_during_read = self._changes_during_read, None
            for model, is_external, change in changes:
                self._count_work(model, is_external, change)
            return self._demand

    def notify_submitted(self, model: str, flow: str, request_id: str) -> None:
        """A request was just queued through this replica: a slot held for its flow takes
        it, or the idle loops wake for it."""
        self._anticipation.arrived(model, flow, request_id)
        self.notify_work(model)

    async def expect(self, model: str) -> Expected:
        """A Submit of ``model`` through this replica is on its way (admission, then the
        enqueue). A loop starts reserving a slot for it now, beside that work rather than
        after it; one that holds the slot by the enqueue has its claim ride the enqueue's
        round trip (``enqueue``). The Submit ends the expectation whatever comes of it."""
        self._expected[model] = self._expected.get(model, 0) + 1
        self._active = True
        now = time.monotonic()
        self._arrivals[model] = (now, now - self._arrivals.get(model, (-math.inf, 0.0))[0])
        if self._wake_for(model, False):
            # The woken loop (holding a slot kept for the model, or sending its Reserve)
            # waits with its slot before the Submit's admission goes out: by the enqueue it
            # is in hand, and the claim can ride the enqueue.
            await asyncio.sleep(0)
        return Expected(self, model)

    async def enqueue(
        self, expected: Expected, request: NewRequest, admission: ScriptCall | None = None
    ) -> SubmitOutcome:
        """``QueueStore.submit`` for an expected Submit; a loop parked with a slot of the
        model claims in the same round trip and is handed the lease. The request is told to
        the loops (``notify_submitted``) before any of them runs."""
        parked = self._take_parked(request.model)
        kept = self._kept_slots.get(request.model, 0)
        if parked is None and (self._speculating or kept):
            # A loop's Reserve for the expected Submits is under way (a slot free now or
            # none: one round trip), or a loop holding a slot kept for the model is on its
            # way to park with it: waiting for it lets the claim ride this enqueue.
            await self._landings.wait(
                request.model, LANDING_SECONDS if self._speculating else KEPT_LANDING_SECONDS
            )
            parked = self._take_parked(request.model)
        if parked is None:
            try:
                outcome = await self.store.submit(request, admission=admission)
            except BaseException:
                expected.end()
                raise
            self._enqueued(expected, request, outcome, None)
            return outcome
        run = asyncio.ensure_future(
            self.store.submit(request, claim_for=self.holder, admission=admission)
        )
        early = self._start_early(expected, request, parked)  # after: the enqueue goes first
        try:
            outcome = await asyncio.shield(run)
        except asyncio.CancelledError:
            # The caller went away; its enqueue and the claim go on, and the claim still
            # reaches its loop (a lease left unrun would hold the request a lease long).
            run.add_done_callback(lambda done: self._landed(expected, request, parked, done, early))
            raise
        except Exception:
            self._landed(expected, request, parked, run, early)
            raise
        self._enqueued(expected, request, outcome, parked, early)
        return outcome

    def _start_early(
        self, expected: Expected, request: NewRequest, parked: _Parked
    ) -> _EarlyStart | None:
        """The request's Generate on ``parked``'s slot, sent now beside its enqueue, so the
        model server works through the enqueue's round trip instead of after it: when its
        caller waits for the end of a short, result-only answer, or streams the answer (it
        watches for the tokens), and the claim riding the enqueue should take this request
        (nothing of its model is believed queued, and no other Submit of it is on its way
        here: enqueues racing each other make a queue whose fair head may be another's). It
        is the request's only once its claim says so (``_enqueued``); else it is cancelled
        before any output is read (a streamed one's first message, asked for to start it,
        is dropped unread). Not for a request that may join another (dedup) or repeat one
        (an idempotency key): those are not the request claimed."""
        holding = parked.holding
        whole = request.result_only
        if (
            holding is None
            or (whole and not expected.await_end)
            or request.fingerprint
            or request.idempotency_key
            or request.prompt_tokens > EARLY_START_MAX_PROMPT_TOKENS
            or self._demand[0].get(request.model)
            or self._expected.get(request.model, 0) > 1
            or self._stop.is_set()
        ):
            return None
        submit = scheduler_pb2.SubmitRequest.FromString(request.payload)
        # The dispatch span starts here, not under the enqueue's: the Generate is its child.
        span = tracing.start_consumer_span(
            DISPATCH_SPAN, request.traceparent, _dispatch_attributes(request.id, holding.slot)
        )
        with trace.use_span(span):  # the call (and the task reading it) run in its context
            call = self._generate_call(
                submit,
                request.id,
                tracing.current_traceparent() or request.traceparent,
                request.deadline_ms,
                holding,
                whole,
            )
            started = asyncio.ensure_future(call) if whole else _Primed(call)
        return _EarlyStart(started, time.monotonic(), span)

    def _landed(
        self,
        expected: Expected,
        request: NewRequest,
        parked: _Parked,
        run: asyncio.Future[SubmitOutcome],
        early: _EarlyStart | None = None,
    ) -> None:
        if run.cancelled() or run.exception() is not None:
            if early is not None:
                # Its slot goes with the early start; a claim that ran unseen is the
                # reaper's once its lease lapses.
                self._not_early(request.model, early)
                _hand(parked, None)
            else:
                _hand(parked, _CLAIM)  # what ran is unknown: the loop claims itself
            expected.end(parked)
        else:
            self._enqueued(expected, request, run.result(), parked, early)

    def _enqueued(
        self,
        expected: Expected,
        request: NewRequest,
        outcome: SubmitOutcome,
        parked: _Parked | None,
        early: _EarlyStart | None = None,
    ) -> None:
        """An expected Submit's enqueue answered: the loops are told what it queued, then
        the parked loop whose claim rode along is handed it (with the Generate started
        early, when that claim took this request)."""
        model = request.model
        if outcome.status == "queued":
            flow = flow_key(request.tenant, priority_class(request.priority))
            self._anticipation.arrived(model, flow, outcome.request_id)
            self._count_work(model, False, +1)
        claimed = outcome.claimed
        mine = outcome.started is not None
        if mine and expected.await_end:
            # Before its loop has the lease: it cannot end unseen.
            expected.ended = self._await_end(outcome.request_id)
        if parked is not None:
            if claimed is not _CLAIM:
                self._count_work(model, False, None if claimed is None else -1)
            if early is not None:
                if mine and outcome.request_id == request.id:
                    self._early[request.id] = early
                    metrics.EARLY_STARTS.labels(model, "confirmed").inc()
                else:
                    self._not_early(model, early)
                    if isinstance(claimed, Lease):
                        # Another request, claimed for the slot the early start took down
                        # with it: back to its place, for a loop with a slot.
                        self._background.spawn(self._give_back(claimed))
                    claimed = None
            _hand(parked, claimed)
        expected.end(parked)
        if outcome.status == "queued" and not mine:
            # Still queued (the claim beside it, if any, took an earlier one): a loop goes
            # for it, as for any request queued here.
            self._wake_for(model, False)

    def _not_early(self, model: str, early: _EarlyStart) -> None:
        """An early start that is not its request's to run: stopped before any output is
        read (the Pool lets its slot go)."""
        early.call.cancel()
        early.span.set_attribute("usher.early_start", "cancelled")
        early.span.end()
        metrics.EARLY_STARTS.labels(model, "cancelled").inc()

    async def _give_back(self, lease: Lease) -> None:
        if await self.store.requeue(lease, "its slot was let go", count_attempt=False):
            self.notify_work(lease.request.model)

    def _await_end(self, request_id: str) -> asyncio.Future[StoredRequest | None]:
        """The end of ``request_id``, which a loop of this replica runs, for a Submit that
        waits for it (``Expected.ended``); ``forget_end`` once it is not waited for."""
        waiter = asyncio.get_running_loop().create_future()
        self._awaited[request_id] = waiter
        return waiter

    def forget_end(self, request_id: str) -> None:
        self._awaited.pop(request_id, None)

    def _ended(self, request_id: str, ended: StoredRequest | None) -> None:
        waiter = self._awaited.pop(request_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(ended)

    def expectation_ended(self, model: str, parked: _Parked | None) -> None:
        """One Submit expected for ``model`` is over; ``parked``: the loop its claim went
        to. Otherwise a parked loop looks again (all of them once none is expected)."""
        left = self._expected.get(model, 0) - 1
        if left > 0:
            self._expected[model] = left
        else:
            self._expected.pop(model, None)
        waiting = self._parked.get(model)
        while waiting and (parked is None or left <= 0):
            woken = waiting.popleft()
            if not woken.handed.done():
                woken.handed.set_result(_CLAIM)
                if left > 0:
                    break
        if waiting is not None and not waiting:
            del self._parked[model]

    def _take_parked(self, model: str) -> _Parked | None:
        """The oldest loop parked with a slot of ``model``, now the Submit's to hand over."""
        waiting = self._parked.get(model)
        while waiting:
            parked = waiting.popleft()
            if not parked.handed.done():
                parked.taken = True
                if not waiting:
                    del self._parked[model]
                return parked
        self._parked.pop(model, None)
        return None

    async def _wait_for_submit(
        self, model: str, holding: _Holding | None = None
    ) -> Lease | bool | None:
        """With a slot of ``model`` in hand and nothing of it believed queued, while a
        Submit of it is expected here: wait for it. Its enqueue brings the claim that rode
        along (a lease, or None: nothing to claim). _CLAIM: claim now, as work is queued or
        nothing was waited for; None: the expected Submits queued nothing."""
        waited = False
        while self._unclaimed(model) <= 0 and self._expected.get(model):
            if self._stop.is_set():
                break
            waited = True
            parked = _Parked(asyncio.get_running_loop().create_future(), holding=holding)
            self._parked.setdefault(model, collections.deque()).append(parked)
            self._landings.wake_all(model.__eq__)  # an enqueue may wait for its slot
            try:
                await asyncio.wait({parked.handed}, timeout=PARK_SECONDS)
            finally:
                waiting = self._parked.get(model)
                if waiting is not None and parked in waiting:
                    waiting.remove(parked)
                    if not waiting:
                        del self._parked[model]
            if parked.taken:
                return await parked.handed  # a Submit took it: it always hands over
        if waited and self._unclaimed(model) <= 0:
            return None
        return _CLAIM

    def _unclaimed(self, model: str) -> int:
        """Requests of ``model`` believed queued that no loop here is claiming yet: with
        none, a loop with a slot parks for the Submits expected here, and the claim riding
        the next enqueue may take that Submit's own request (its caller is then answered
        with the end). Counting a request being claimed already would send every loop
        after it, so each enqueue would find the one before it queued, and be claimed
        apart from its own Submit, again and again."""
        return self._demand[0].get(model, 0) - self._claiming[model]

    def notify_work(self, model: str, external: bool = False) -> None:
        """A request was just queued here: wake the idle loops (other replicas' loops find
        it on their next look)."""
        self._count_work(model, external, +1)
        self._active = True
        self._wake_for(model, external)

    def _wake_for(self, model: str, external: bool) -> bool:
        """Work of ``model`` is queued: a loop holding a slot kept for the model runs it
        (counted as reserving from now), else an idle loop wakes; False: none was idle."""
        waiting = None if external else self._kept_waiting.get(model)
        while waiting:
            waiter = waiting.pop()
            if not waiter.done():
                self._reserving[False] += 1
                waiter.set_result(True)
                return True
        return self._idle[external].wake_first()

    def _wake_next(self, work: dict[str, int], external: bool) -> None:
        """More work than loops on it: the next loop starts (one holding a kept slot of a
        model with work first)."""
        for model in () if external else work:
            if self._kept_waiting.get(model):
                self._wake_for(model, external)
                return
        self._idle[external].wake_first()

    async def _await_work(self, model: str) -> bool:
        """Wait (up to keep_slot_seconds) for a request of ``model`` to be queued, holding
        a slot kept for it; True when woken for one (then counted as reserving)."""
        if self._stop.is_set():
            return False
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        waiting = self._kept_waiting.setdefault(model, [])
        waiting.append(waiter)
        timer = loop.call_later(self.settings.keep_slot_seconds, _resolve, waiter, False)
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self._reserving[False] -= 1  # woken, then cancelled: not reserving after all
            raise
        finally:
            timer.cancel()
            with contextlib.suppress(ValueError):
                waiting.remove(waiter)
            if not waiting and self._kept_waiting.get(model) is waiting:
                del self._kept_waiting[model]

    def _count_kept(self, model: str, change: int) -> None:
        left = self._kept_slots.get(model, 0) + change
        if left > 0:
            self._kept_slots[model] = left
        else:
            self._kept_slots.pop(model, None)

    def _count_work(self, model: str, external: bool, change: int | None) -> None:
        """Move the believed demand by ``change`` (None: the lane was found empty)."""
        if self._changes_during_read is not None:
            self._changes_during_read.append((model, external, change))
        counts = self._demand[1 if external else 0]
        left = 0 if change is None else counts.get(model, 0) + change
        if left > 0:
            counts[model] = left
        else:
            counts.pop(model, None)

    async def _poll_for_work(self, stop: asyncio.Event) -> None:
        """Wake an idle loop when work queued through another replica waits here."""
        rest = IDLE_POLL_SECONDS
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), rest)
            try:
                local, external = await self.models_with_work()
            except Exception as exc:  # Redis away: the loops' own errors report it
                log.debug("work poll failed", error=str(exc))
                continue
            busy = self._active or bool(local) or bool(external)
            self._active = False
            rest = IDLE_POLL_SECONDS if busy else min(2 * rest, IDLE_POLL_MAX_SECONDS)
            for is_external, work in ((False, local), (True, external)):
                if sum(work.values()) > self._reserving[is_external]:
                    self._wake_next(work, is_external)
        for idle in self._idle.values():  # shutting down: no loop waits out its rest
            idle.wake_all()
        for waiting in list(self._kept_waiting.values()):
            for waiter in waiting:
                _resolve(waiter, False)
        for still in self._parked.values():
            for parked in still:
                if not parked.handed.done() and not parked.taken:
                    parked.handed.set_result(_CLAIM)

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        self.resize(self.settings.concurrency or DEFAULT_LOOPS)
        helpers = [self._listen_for_cancels(stop), self._poll_for_work(stop)]
        if self.settings.concurrency is None:
            helpers.append(self._follow_fleet(stop))
        try:
            await asyncio.gather(*helpers)
            while self._loops:  # each ends once stop is set (a request finishing first)
                await asyncio.gather(*self._loops.values())
        except BaseException:
            for task in self._loops.values():
                task.cancel()
            raise

    @property
    def loops_wanted(self) -> int:
        """Dispatch loops wanted now (those beyond it end once idle)."""
        return self._loops_wanted

    @property
    def loops_running(self) -> int:
        """Dispatch loops running now (more than wanted while the extra ones finish)."""
        return len(self._loops)

    def resize(self, loops: int) -> None:
        """Run ``loops`` dispatch loops: the missing ones start now; those of an index at
        or beyond it end when they next go idle."""
        self._loops_wanted = loops
        metrics.DISPATCH_LOOPS.set(loops)
        for index in range(loops):
            if index not in self._loops:
                self._loops[index] = asyncio.create_task(self._loop(index))

    async def _follow_fleet(self, stop: asyncio.Event) -> None:
        """A loop for each slot of the fleet, as the Pool lists it now and then."""
        while not stop.is_set():
            rest = FLEET_REFRESH_SECONDS
            try:
                listed = await self._pool.ListInstances(
                    pool_pb2.ListInstancesRequest(), metadata=self._metadata, timeout=5.0
                )
            except Exception as error:  # the Pool away or not up yet: asked again soon
                log.debug("fleet not listed", error=str(error))
                rest = FLEET_RETRY_SECONDS
            else:
                wanted = loops_for_fleet(listed.instances)
                if wanted != self._loops_wanted:
                    log.info("dispatch loops follow the fleet", loops=wanted)
                    self.resize(wanted)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), rest)

    async def _loop(self, index: int) -> None:
        external = external_loop(index)
        kept = _KeptSlot()
        try:
            await self._dispatch_until(index, external, kept)
        finally:
            del self._loops[index]  # a loop of its index may start again from here on
            if kept.slot is not None:  # ending: its slot goes back now
                self._count_kept(kept.slot.model, -1)
                if kept.counted:
                    self._reserving[external] -= 1
                with contextlib.suppress(Exception):
                    await self._release(kept.slot)

    async def _dispatch_until(self, index: int, external: bool, kept: _KeptSlot) -> None:
        while not self._stop.is_set() and index < self._loops_wanted:
            try:
                worked = await self.dispatch_one(external, kept)
            except grpc.aio.AioRpcError as error:
                log.warning("pool unreachable", code=error.code().name, details=error.details())
                worked = False
                await asyncio.sleep(0.5)
            except Exception:
                log.exception("dispatch failed")
                worked = False
                await asyncio.sleep(0.5)
            if not worked:
                await self._idle[external].wait(None, IDLE_REST_SECONDS)
        if not self._stop.is_set() and self._work(external):
            # Ended by a smaller fleet, perhaps just woken for work: the wake goes on.
            self._idle[external].wake_first()

    async def dispatch_one(self, external: bool = False, kept: _KeptSlot | None = None) -> bool:
        """Reserve a slot, claim a request and run it; False when there was nothing to
        do. ``kept``: the slot the Pool kept for this loop after its last answer (given
        back here when no request of its model comes for it), and where the next one is
        left."""
        work = self._work(external)
        reuse: pool_pb2.Slot | None = None
        if kept is not None and kept.slot is not None:
            reuse = await self._kept_for_work(kept, work, external)
            work = self._work(external)
        # Only as many loops wait for slots as there are requests to run: a herd of idle
        # loops reserving (then releasing) slots for one request costs dozens of scripts.
        if reuse is None and (not work or self._reserving[external] >= sum(work.values())):
            return False
        self._reserving[external] += 1
        if sum(work.values()) > self._reserving[external]:
            self._wake_next(work, external)  # more work than loops on it: start the next
        # A loop beyond the requests believed queued reserves for the Submits expected here:
        # for their models, a slot free now only (a Submit's enqueue may wait for it).
        speculative = (
            reuse is None
            and not external
            and sum(self._demand[0].values()) < self._reserving[False]
        )
        try:
            claimed = await self._reserve_and_claim(
                sorted(self._expected if speculative else work),
                external,
                reuse,
                speculative,
                keeping=kept is not None,
            )
        finally:
            self._reserving[external] -= 1
        if claimed is None:
            if reuse is not None and kept is not None:
                # Another replica took the request: the slot stays kept for the next one.
                kept.slot, kept.counted = reuse, True
                self._count_kept(reuse.model, +1)
                self._reserving[external] += 1
                return True
            return False
        lease, slot = claimed
        reused = slot is reuse
        waited = max(0, lease.request.started_ms - lease.request.created_ms) / 1000
        metrics.QUEUE_WAIT.labels(slot.model).observe(waited)
        if lease.request.promised_wait_ms and lease.request.attempts == 1:
            promised = lease.request.promised_wait_ms / 1000
            metrics.ETA_ERROR.labels(slot.model).observe(abs(waited - promised))
        early = self._early.get(lease.request.id)
        with (
            tracing.consumer_span(
                DISPATCH_SPAN,
                lease.request.traceparent,
                _dispatch_attributes(lease.request.id, slot),
            )
            if early is None
            else trace.use_span(early.span, end_on_exit=True)  # begun with its Generate
        ):
            try:
                footprint = await self.run_request(lease, slot, kept, reused)
            finally:
                self._anticipation.ended(slot.model, _flow(lease), lease.request.id)
        # Whatever the outcome, it no longer counts toward the caller's concurrency quota
        # (a requeued request is charged again only if it is resubmitted, never twice), and
        # its storage is charged at what it keeps now (its result, or its prompt if queued):
        # the loop goes on meanwhile unless a concurrency slot is to be freed.
        if footprint is None:  # not measured by its completion (requeued, cancelled, failed)
            footprint = await self.store.footprint(lease.request.model, lease.request.id)
        await self.quotas.settle_soon(lease.request.tenant, lease.request.id, footprint)
        return True

    async def _kept_for_work(
        self, kept: _KeptSlot, work: dict[str, int], external: bool
    ) -> pool_pb2.Slot | None:
        """The slot kept for this loop, to run the next request of its model: at once when
        more is queued than other loops are on, else when a request of the model is
        queued within keep_slot_seconds; None (given back to the Pool) when none came."""
        slot = cast(pool_pb2.Slot, kept.slot)
        self._reserving[external] -= 1  # counted as reserving since its answer
        kept.counted = False
        # Other loops are on all that is queued: this one waits for the model's next.
        covered = not work.get(slot.model) or self._reserving[external] >= sum(work.values())
        if covered and await self._await_work(slot.model):
            self._reserving[external] -= 1  # the waker counted this loop: counted again
        kept.slot = None
        # It parks for an expected Submit (if any) before its next await: an enqueue
        # waiting for it looks again after that.
        self._count_kept(slot.model, -1)
        self._landings.wake_all(slot.model.__eq__)
        if self._work(external).get(slot.model):  # queued or expected here by now
            return slot
        await self._release(slot)  # nothing of its model came: back to the Pool
        return None

    def _work(self, external: bool) -> dict[str, int]:
        """Requests per model a loop may reserve a slot for: those believed queued, and on
        the local lane the Submits expected here."""
        if external:
            return self._demand[1]
        if not self._expected:
            return self._demand[0]
        work = dict(self._demand[0])
        for model, count in self._expected.items():
            work[model] = work.get(model, 0) + count
        return work

    async def _release(self, slot: pool_pb2.Slot) -> None:
        await self._pool.Release(pool_pb2.ReleaseRequest(slot_id=slot.id), metadata=self._metadata)

    async def _reserve_and_claim(
        self,
        models: list[str],
        external: bool,
        reuse: pool_pb2.Slot | None = None,
        speculative: bool = False,
        keeping: bool = False,
    ) -> tuple[Lease, pool_pb2.Slot] | None:
        """A slot for one of ``models`` and the next request of its model, claimed under
        a lease (the slot handed back when another replica took the request first). With
        ``reuse`` (kept for this loop after its last answer) the request is claimed for it
        with no Reserve (the Generate asks the Pool to run on it: reuse_kept_slot) and the
        slot is the caller's to keep when another replica took the request. The
        demand believed here moves before this returns, so a loop that looks meanwhile
        (still counted as reserving) does not go for the same request. ``speculative``:
        for Submits expected here, a slot free now or none. ``keeping``: the loop can keep
        the slot after the answer."""
        if reuse is not None:
            lease = await self._claim_holding(_Holding(reuse, True, keeping), external)
            return None if lease is None else (lease, reuse)
        wait = 0.0 if speculative else self.settings.reserve_wait_seconds
        self._speculating += speculative
        try:
            reply = await self._pool.Reserve(
                pool_pb2.ReserveRequest(
                    models=models,
                    holder=self.holder,
                    route=request_pb2.ROUTE_EXTERNAL if external else request_pb2.ROUTE_LOCAL,
                    wait=duration_from_seconds(wait),
                ),
                metadata=self._metadata,
                timeout=wait + 5,
            )
        finally:
            if speculative:
                self._speculating -= 1
                # Woken now, they run after this loop has parked with its slot (below).
                self._landings.wake_all()
        if not reply.HasField("slot"):
            return None
        slot = reply.slot
        lease = await self._claim_holding(_Holding(slot, False, keeping), external)
        if lease is None:  # another replica took the last request first
            await self._release(slot)
            return None
        return lease, slot

    async def _claim_holding(self, holding: _Holding, external: bool) -> Lease | None:
        """``_claim`` for the model of the slot held, the slot handed back when the claim
        fails (Redis away, no connection free in a burst): left alone, it would stay taken
        until its lease lapsed (30 s), a slot of the model fewer all that time."""
        try:
            return await self._claim(holding.slot.model, external, holding)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._release(holding.slot)
            raise

    async def _claim(
        self, model: str, external: bool, holding: _Holding | None = None
    ) -> Lease | None:
        """With a slot for ``model`` in hand (``holding``): its next request under a lease,
        the fair head or, when the slot is held for a flow (anticipation.py), that flow's
        next request."""
        first = None if external else await self._anticipation.first_claim(model)
        if first is not None:
            metrics.SLOT_HOLDS.labels(model, "arrived" if first else "ran_out").inc()
        elif not external:
            handed = await self._wait_for_submit(model, holding)
            if handed is not _CLAIM:  # claimed beside an enqueue (the demand moved there)
                lease = cast(Lease | None, handed)
                self._active = True
                if lease is not None:
                    self._anticipation.started(model, _flow(lease), lease.request.id)
                return lease
        if not external:
            self._claiming[model] += 1
        try:
            lease = await self.store.claim(model, self.holder, external=external, first=first or "")
        finally:
            if not external:
                self._claiming[model] -= 1
                if not self._claiming[model]:
                    del self._claiming[model]
        self._count_work(model, external, None if lease is None else -1)
        self._active = True
        if lease is not None:
            self._anticipation.started(model, _flow(lease), lease.request.id)
        return lease

    def _answered(self, lease: Lease) -> None:
        """``lease``'s answer is done and its slot free: held for its flow, if due. From
        here it is no longer in service: its completion is still being written while the
        slot may run the next request, which would otherwise count twice toward the
        model's slots in service (and let a flow past its share be held for)."""
        if lease.request.route != request_pb2.ROUTE_EXTERNAL:
            model, flow = lease.request.model, _flow(lease)
            self._anticipation.answered(model, flow, lease.request.id, model in self._demand[0])
            self._anticipation.ended(model, flow, lease.request.id)

    def _worth_keeping(self, slot: pool_pb2.Slot) -> bool:
        """Whether to ask the Pool to keep ``slot`` after the answer, for the next request
        of its model: more of it is queued, it keeps several of this replica's loops busy
        (more usually comes while this one runs), or its last two Submits here came within
        keep_slot_seconds of each other (one request at a time, asked again at once: the
        next needs no Reserve and no Release). A kept slot that no request comes for
        within keep_slot_seconds is released then."""
        return (
            slot.route == request_pb2.ROUTE_LOCAL
            and not self._stop.is_set()
            and (
                self._demand[0].get(slot.model, 0) > 0
                or self._anticipation.running(slot.model) > 1
                or self._arrivals.get(slot.model, (0.0, math.inf))[1]
                <= self.settings.keep_slot_seconds
            )
        )

    async def run_request(
        self,
        lease: Lease,
        slot: pool_pb2.Slot,
        kept: _KeptSlot | None = None,
        reused: bool = False,
    ) -> Footprint | None:
        """Run a claimed request to its end; what it holds in Redis when it completed
        (None when it ended otherwise). With ``kept``, the slot may stay held for the
        next request of its model when more are queued (left in ``kept``); ``reused``:
        ``slot`` is one kept after the loop's last answer, not reserved for this one."""
        try:
            return await self._run_request(lease, slot, kept, reused)
        finally:
            self._ended(lease.request.id, None)  # a no-op once its completion told it

    async def _run_request(
        self,
        lease: Lease,
        slot: pool_pb2.Slot,
        kept: _KeptSlot | None,
        reused: bool,
    ) -> Footprint | None:
        submit = scheduler_pb2.SubmitRequest.FromString(lease.request.payload)
        early = self._early.pop(lease.request.id, None)
        call: Any
        if early is not None:  # sent beside its enqueue, on this loop's slot
            call, whole, started = early.call, early.whole, early.at
        else:
            # A caller of the result alone over gRPC: one unary call (a stream of one
            # message costs more on both ends); in process (usher serve) streams cost
            # nothing extra.
            whole = submit.result_only and self._channel is not None
            call = self._generate_call(
                submit,
                lease.request.id,
                tracing.current_traceparent() or lease.request.traceparent,
                lease.request.deadline_ms,
                _Holding(slot, reused, kept is not None),
                whole,
            )
            started = time.monotonic()
        progress = ProgressBuffer(self.progress, lease, self.settings.token_flush_seconds)
        keeping = (slot, kept) if kept else None
        if early is not None and isinstance(early.call, asyncio.Future) and early.call.done():
            # Answered whole before its claim came back: nothing is left to watch over.
            work_or_error = await self._consume(call, progress, lease, started, keeping, whole)
        else:
            ended = asyncio.Event()
            # The runner first: the Generate starts at the next turn, before the
            # heartbeat's setup.
            runner = asyncio.create_task(
                self._consume(call, progress, lease, started, keeping, whole)
            )
            watcher = asyncio.create_task(self._heartbeat(lease, ended))
            drain = asyncio.create_task(self._drain_deadline())
            done, _ = await asyncio.wait(
                {watcher, runner, drain}, return_when=asyncio.FIRST_COMPLETED
            )
            drain.cancel()
            if drain in done and not runner.done():
                # Shutting down and it is still running: stop it and hand it back, uncounted.
                call.cancel()
                runner.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await runner
                await _stop_heartbeat(watcher, ended, lease.request.id in self._beating)
                await progress.close()  # to be run again from the start: partial output is moot
                await self.store.requeue(
                    lease, "scheduler replica shutting down", count_attempt=False
                )
                return None
            if watcher in done and not runner.done():
                call.cancel()  # closes the stream: the Pool stops the model server's work
                runner.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await runner
                await progress.close()
                stop = watcher.result()
                if stop is None or stop.lost:
                    return None
                # An empty error lets the store record the reason given with the cancel.
                metrics.REQUESTS.labels(lease.request.model, "cancelled").inc()
                return await self.store.finish(lease, FinishedWork(state=CANCELLED))
            await _stop_heartbeat(watcher, ended, lease.request.id in self._beating)
            work_or_error = runner.result()
        pending = await progress.close()
        if isinstance(work_or_error, FinishedWork):
            # The result says it all to a caller who reads only that.
            work = work_or_error
            finished_ms = now_ms()
            finishing = asyncio.ensure_future(
                self.store.finish(
                    lease,
                    work,
                    () if submit.result_only else pending,
                    streamed=not submit.result_only,
                    finished_ms=finished_ms,
                )
            )
            if lease.request.id in self._awaited:
                # The Submit waiting here answers while the completion is on its way (the
                # task above writes it first): one round trip less for its caller. Should
                # the write fail, the caller still has its answer and the lease runs out:
                # the request runs again, nothing is lost.
                self._ended(
                    lease.request.id,
                    lease.request.ended(
                        work.state, finished_ms, work.error, work.result, work.usage
                    ),
                )
            footprint = await finishing
            metrics.REQUESTS.labels(lease.request.model, "completed").inc()
            metrics.PROCESSING_SECONDS.labels(lease.request.model).observe(work.service_ms / 1000)
            return footprint
        await self.store.progress_events(lease, pending)  # what it said before it failed
        await self._handle_error(lease, work_or_error, reused)
        return None

    def _generate_call(
        self,
        submit: scheduler_pb2.SubmitRequest,
        request_id: str,
        traceparent: str,
        deadline_ms: int,
        holding: _Holding,
        whole: bool,
    ) -> Any:
        """The Pool's Generate (or, ``whole``, GenerateWhole) of a request on the slot held."""
        slot = holding.slot
        generate = pool_pb2.GenerateRequest(
            slot_id=slot.id,
            request_id=request_id,
            model=slot.model,
            options=submit.options,
            traceparent=traceparent,
            # A caller who reads only the result gets no tokens streamed: none are sent.
            stream=not submit.result_only,
            keep_slot=holding.keeping and self._worth_keeping(slot),
            reuse_kept_slot=holding.reused,
        )
        kind = submit.WhichOneof("input")
        if kind is not None:
            getattr(generate, kind).CopyFrom(getattr(submit, kind))
        timeout = None
        if deadline_ms:
            timeout = max(0.1, deadline_ms / 1000 - time.time())
        if submit.HasField("request_timeout"):
            # The Pool enforces the run-time limit (and closes the model server's call);
            # the margin only keeps a wedged Pool from holding the request for ever.
            generate.timeout.CopyFrom(submit.request_timeout)
            limit = submit.request_timeout.ToMilliseconds() / 1000 + RUN_LIMIT_MARGIN_SECONDS
            timeout = limit if timeout is None else min(timeout, limit)
        if whole:
            return self._pool.GenerateWhole(
                pool_pb2.GenerateWholeRequest(request=generate),
                metadata=self._metadata,
                timeout=timeout,
            )
        return self._pool.Generate(generate, metadata=self._metadata, timeout=timeout)

    async def _drain_deadline(self) -> None:
        await self._stop.wait()
        await asyncio.sleep(self.settings.drain_seconds)

    async def _heartbeat(self, lease: Lease, ended: asyncio.Event) -> _Cancelled | None:
        """Keep the lease until ``ended``; returns when the request is cancelled or its lease
        lost (None when it simply ended)."""
        interval = lease.lease_ms / 3000
        nudged = self._cancel_nudges.setdefault(lease.request.id, asyncio.Event())
        try:
            while not ended.is_set():
                # Wake early when a cancel is announced; the flag read here decides.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await nudged.wait()
                nudged.clear()
                if ended.is_set():
                    break
                self._beating.add(lease.request.id)
                try:
                    verdict = await self.store.heartbeat(lease)
                finally:
                    self._beating.discard(lease.request.id)
                if verdict != 0:
                    return _Cancelled(lost=verdict == -1)
            return None
        finally:
            self._cancel_nudges.pop(lease.request.id, None)

    async def _listen_for_cancels(self, stop: asyncio.Event) -> None:
        """Nudge the heartbeat of a request running here as soon as its cancel is
        published, instead of up to a third of a lease later."""
        while not stop.is_set():
            try:
                async with self.store.redis.pubsub() as pubsub:
                    await pubsub.subscribe(keys.CANCELS)
                    while not stop.is_set():
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=0.5
                        )
                        if message is not None:
                            nudged = self._cancel_nudges.get(message["data"].decode())
                            if nudged is not None:
                                nudged.set()
            except Exception as exc:  # Redis away: heartbeats still carry cancels
                log.warning("cancel channel lost", error=str(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)

    async def _consume(
        self,
        call: Any,  # Generate's stream, or GenerateWhole's call with ``whole``
        progress: ProgressBuffer,
        lease: Lease,
        started: float,
        keeping: tuple[pool_pb2.Slot, _KeptSlot] | None = None,
        whole: bool = False,
    ) -> FinishedWork | grpc.aio.AioRpcError:
        try:
            if whole:
                answer: pool_pb2.GenerateWholeResponse = await call
                return self._done(lease, answer.done, started, keeping)
            async for reply in call:
                which = reply.WhichOneof("event")
                if which == "started":
                    progress.started(reply.started.instance, reply.started.model)
                elif which == "delta":
                    delta = reply.delta
                    progress.tokens(delta.text, delta.completion_tokens)
                elif which == "done":
                    return self._done(lease, reply.done, started, keeping)
        except grpc.aio.AioRpcError as error:
            return error
        return cast(grpc.aio.AioRpcError, _StreamEnded())

    def _done(
        self,
        lease: Lease,
        done: pool_pb2.GenerationDone,
        started: float,
        keeping: tuple[pool_pb2.Slot, _KeptSlot] | None,
    ) -> FinishedWork:
        if done.slot_kept and keeping is not None:
            # Held for this loop's next request: it counts as a loop reserving,
            # so work queued meanwhile does not wake another loop to reserve.
            keeping[1].slot = keeping[0]
            keeping[1].counted = True
            self._count_kept(keeping[0].model, +1)
            self._reserving[False] += 1
        self._answered(lease)  # the Pool freed its slot (or kept it for this loop)
        return _finished(lease, done, time.monotonic() - started)

    async def _handle_error(
        self, lease: Lease, error: grpc.aio.AioRpcError, reused: bool = False
    ) -> None:
        code = error.code()
        details = error.details() or code.name
        external = lease.request.route == request_pb2.ROUTE_EXTERNAL
        if reused and code == grpc.StatusCode.FAILED_PRECONDITION:
            # The kept slot was not the Pool's to give again and no other freed in time:
            # nothing ran, so it goes back to its place as it was, no attempt counted.
            if await self.store.requeue(lease, details):
                self.notify_work(lease.request.model, external)
            return
        retryable = (
            grpc.StatusCode.UNAVAILABLE,  # no instance could run it
            grpc.StatusCode.FAILED_PRECONDITION,  # its slot expired
            grpc.StatusCode.ABORTED,  # its model server died mid-answer
        )
        if code in retryable and lease.request.attempts < lease.request.max_attempts:
            # Back to its original place after a backoff, to run again elsewhere; watchers
            # are told to discard any partial output (the requeued event). It waits out the
            # backoff QUEUED, out of line: no lease, no dispatcher, no slot held (the reaper
            # puts it back and wakes the dispatchers).
            delay = exponential_backoff(
                lease.request.attempts,
                self.settings.retry_backoff_seconds,
                self.settings.retry_backoff_max_seconds,
            )
            backoff_ms = round(delay * 1000)
            requeued = await self.store.requeue(
                lease, details, count_attempt=True, backoff_ms=backoff_ms
            )
            if requeued and backoff_ms == 0:
                self.notify_work(lease.request.model, external)
            return
        metrics.REQUESTS.labels(lease.request.model, "failed").inc()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            # The Pool's words when its run-time limit ended it; else the caller's deadline.
            cause = error.details() if "run-time limit" in (error.details() or "") else ""
            await self.store.finish(
                lease,
                FinishedWork(
                    state=FAILED,
                    error=f"DEADLINE_EXCEEDED: {cause or 'deadline passed while running'}",
                ),
            )
            return
        await self.store.finish(lease, FinishedWork(state=FAILED, error=details))


async def _stop_heartbeat(
    watcher: asyncio.Task[_Cancelled | None], ended: asyncio.Event, beating: bool = True
) -> None:
    """Stop a request's heartbeat. A cancel alone is not enough: one that lands while a
    Redis call inside is timing out or retrying can be swallowed, and the heartbeat would
    then hold the lease (and the request, never finished) for ever. The flag ends its loop
    at the next turn whatever happens to the cancel, and this waits a bounded time for a
    call under way (``beating``). One parked between beats makes no further call (the
    flag): nothing to wait for, the usual case and on the answer's path."""
    ended.set()
    watcher.cancel()
    if not beating:
        watcher.add_done_callback(_retrieve)
        return
    await asyncio.wait({watcher}, timeout=HEARTBEAT_STOP_SECONDS)
    if watcher.done():
        _retrieve(watcher)


def _resolve(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)


def _retrieve(watcher: asyncio.Task[_Cancelled | None]) -> None:
    if not watcher.cancelled():
        watcher.exception()  # retrieved: an outage it met needs no second report


class _StreamEnded(grpc.aio.AioRpcError):
    def __init__(self) -> None:
        super().__init__(
            grpc.StatusCode.UNAVAILABLE,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            details="the pool closed the stream without a result",
        )


def _hand(parked: _Parked, claimed: Lease | bool | None) -> None:
    """Give ``parked`` what its Submit's claim got (unless its loop stopped waiting: a
    lease no loop runs is handed back by the reaper when it runs out)."""
    if not parked.handed.done():
        parked.handed.set_result(claimed)


def _flow(lease: Lease) -> str:
    return flow_key(lease.request.tenant, lease.request.priority)


def _finished(lease: Lease, done: pool_pb2.GenerationDone, seconds: float) -> FinishedWork:
    usage = request_pb2.Usage()
    usage.CopyFrom(done.usage)
    waited = max(0, lease.request.started_ms - lease.request.created_ms) / 1000
    usage.queue_wait.CopyFrom(duration_from_seconds(waited))
    prompt = int(usage.prompt_tokens) or lease.request.prompt_tokens
    output = int(usage.completion_tokens)
    return FinishedWork(
        state=COMPLETED,
        result=done.result.SerializeToString(),
        usage=usage.SerializeToString(),
        actual_tokens=prompt + output,
        service_ms=seconds * 1000,
        tokens_per_second=usage.tokens_per_second,
        output_tokens=output,
    )
