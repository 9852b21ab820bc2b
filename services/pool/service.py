"""gRPC handlers of the Pool: slots (Reserve/Release), the Generate proxy, fleet status, admin.

Routing decisions are pure (routing.py); this module gathers their inputs (registry state,
slot usage from Redis), acts on the decision, and streams the model server's output.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from google.protobuf import struct_pb2

from services.pool import routing
from services.pool.circuit import CircuitBreaker, CircuitState, admit_all
from services.pool.registry import InstanceState, Registry
from services.pool.settings import (
    KIND_OLLAMA,
    NOT_PLACED,
    ROLE_CHAT,
    ROLE_EMBEDDING,
    InstanceSpec,
    PoolSettings,
)
from services.pool.slots import USAGE_MAX_AGE_SECONDS, SlotGrant, SlotStore, grant_of
from services.pool.stats import PoolStats
from services.pool.upstream import (
    Delta,
    Done,
    Event,
    ModelNotFound,
    Started,
    UpstreamError,
    status_is_retryable,
)
from usher.auth import Authenticator, Principal
from usher.config import ConfigError
from usher.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
    UpstreamFailed,
)
from usher.grpc_types import Context
from usher.logs import get_logger
from usher.structs import dict_to_struct, duration_from_seconds
from usher.v1 import pool_pb2, pool_pb2_grpc, request_pb2
from usher.waiters import Waiters

__all__ = ["SERVICE_ROLE", "PoolAdminServicer", "PoolServicer", "request_role"]

log = get_logger(__name__)

#: The role a caller needs to reserve slots and run requests (the scheduler's dispatchers).
SERVICE_ROLE = "service"
MAX_WAIT_SECONDS = 60.0
DEFAULT_WAIT_SECONDS = 10.0
#: How often a waiting Reserve looks again when no local release woke it.
POLL_SECONDS = 0.05
#: How long a Reserve waits for a warm slot before loading the model elsewhere (affinity).
AFFINITY_GRACE_SECONDS = 3.0
#: A slot kept this long for its dispatcher's next request of a model is given up to a
#: Reserve of that model that has to wait: the dispatcher had no request for it meanwhile.
KEPT_IDLE_SECONDS = 0.1
#: Token deltas are sent to the dispatcher at most this often, batched.
COALESCE_SECONDS = 0.02


class FleetRouter:
    """Reserve slots by routing decision; shared by Reserve and Generate's failover."""

    def __init__(self, registry: Registry, slots: SlotStore, settings: PoolSettings) -> None:
        self.registry = registry
        self.slots = slots
        self.strategy = routing.Strategy(settings.strategy)
        #: Weighted round robin's decision counter per (model, lane): each model rotates
        #: through its own instances, advanced once per decision that grants a slot.
        self._turns: dict[tuple[str, bool], int] = {}
        #: Rotates which of a Reserve's models is tried first.
        self._model_turn = itertools.count()
        #: model → the role its requests need ("chat" or "embedding"), learned from the
        #: requests run here, so Reserve routes to hosts of that role.
        self.model_roles: dict[str, str] = {}
        #: Reserves waiting for a slot here, oldest first, with the models each asks for.
        #: A release wakes one of them (the oldest that wants the freed slot's model), not
        #: every waiter: each wakeup costs a round of scripts.
        self._waiting: Waiters[frozenset[str]] = Waiters()
        #: Slots granted here lately (id → grant, when it was granted): the Generate that
        #: follows a Reserve on this replica needs no Redis read to find its slot.
        self._granted: dict[str, tuple[SlotGrant, float]] = {}
        #: Slot id → the round-robin turn its grant took, until the slot is used: a slot
        #: handed back unused (its dispatcher found no request left) returns its turn, so
        #: the rotation's shares count only requests that ran.
        self._grant_turns: dict[str, tuple[tuple[str, bool], int]] = {}
        self._returned_turns: dict[tuple[str, bool], list[int]] = {}
        #: Slot id → the half-open circuits whose trial call its grant took.
        self._trials: dict[str, list[CircuitBreaker]] = {}
        #: (model, external lane) routed since watch_usage last looked.
        self._routed: set[tuple[str, bool]] = set()
        #: Slots kept for their dispatcher after an answer (id → grant, when its lease was
        #: last set), oldest first: granted again on its next Reserve with no Redis call,
        #: or released when another model waits here or its lease would need renewing.
        self._kept: dict[str, tuple[SlotGrant, float]] = {}
        #: When each kept slot was kept (monotonic).
        self._kept_at: dict[str, float] = {}

    def _fresh(self, granted_at: float) -> bool:
        """Granted well inside the slot's lease (half of it ago at most)."""
        return time.monotonic() - granted_at < self.slots.lease_ms / 2000

    def _reusable(self, renewed_at: float) -> bool:
        """A kept slot's lease needs no renewal yet (set a third of a lease ago at most)."""
        return time.monotonic() - renewed_at < self.slots.lease_ms / 3000

    def keep(self, grant: SlotGrant) -> bool:
        """Keep ``grant`` held for its dispatcher's next request of its model instead of
        releasing it (False: release it, another model waits here, or routing is a
        rotation that every request takes its turn in). Not renewed from now: its lease
        frees it if the dispatcher goes away."""
        if self.strategy is routing.Strategy.WEIGHTED_ROUND_ROBIN:
            return False
        if self._waiting.waiting(lambda models: grant.model not in models):
            return False
        renewed_at = self.slots.unhold(grant)
        if renewed_at is None:
            return False
        self._forget_stale()
        self._kept[grant.id] = (grant, renewed_at)
        self._kept_at[grant.id] = time.monotonic()
        return True

    def reuse(self, slot_id: str, models: list[str], external: bool) -> SlotGrant | None:
        """The kept slot ``slot_id`` granted again, when its model is the only one asked
        for, no Reserve for another model waits here, its lease needs no renewal and its
        instance still takes the model's work; else it is released (None)."""
        entry = self._kept.pop(slot_id, None)
        self._kept_at.pop(slot_id, None)
        if entry is None:
            grant = _grant_or_none(slot_id)
            if grant is not None:  # kept by another replica, or lapsed: freed all the same
                self.release(grant)
            return None
        grant, renewed_at = entry
        state = self.registry.instances.get(grant.instance)
        if (
            models == [grant.model]
            and grant.route == (request_pb2.ROUTE_EXTERNAL if external else request_pb2.ROUTE_LOCAL)
            and self._reusable(renewed_at)
            and not self._waiting.waiting(lambda wanted: wanted != {grant.model})
            and state is not None
            and state.healthy
            and not state.draining
            and state.serves(grant.model)
            and self._admit(state, grant.model) == []
        ):
            self._forget_stale()
            self._granted[grant.id] = (grant, renewed_at)
            return grant
        self.release(grant)
        return None

    def _kept_lately(self, grant: SlotGrant) -> bool:
        """``grant`` was kept less than KEPT_IDLE_SECONDS ago."""
        return time.monotonic() - self._kept_at.get(grant.id, 0.0) < KEPT_IDLE_SECONDS

    def _release_kept(self, keep: Callable[[SlotGrant], bool]) -> None:
        """Release the kept slots ``keep`` refuses (their dispatchers reserve again)."""
        for slot_id, (grant, _) in list(self._kept.items()):
            if not keep(grant):
                del self._kept[slot_id]
                self._kept_at.pop(slot_id, None)
                self.release(grant)

    def _forget_stale(self) -> None:
        if self._kept and not self._reusable(next(iter(self._kept.values()))[1]):
            # Kept too long for its lease: released (its dispatcher reserves again).
            self._release_kept(lambda grant: self._reusable(self._kept[grant.id][1]))
        while self._granted:  # oldest first: drop grants nobody came back for
            oldest = next(iter(self._granted))
            if self._fresh(self._granted[oldest][1]):
                break
            del self._granted[oldest]
            self._grant_turns.pop(oldest, None)
            self.release_trial(oldest)  # its caller vanished: the trial must not stay taken

    def _remember(self, grant: SlotGrant) -> None:
        self._forget_stale()
        self._granted[grant.id] = (grant, time.monotonic())

    def take_granted(
        self, slot_id: str, *, used: bool = True
    ) -> tuple[SlotGrant, float] | tuple[None, None]:
        """A slot this replica granted moments ago (then forgotten: it is in use, or with
        ``used`` false, handed back unused), with when its lease was set (monotonic)."""
        turn = self._grant_turns.pop(slot_id, None)
        if turn is not None and not used:
            self._returned_turns.setdefault(turn[0], []).append(turn[1])
        entry = self._granted.pop(slot_id, None)
        return entry if entry is not None and self._fresh(entry[1]) else (None, None)

    def take_kept(self, slot_id: str) -> SlotGrant | None:
        """A slot kept here for its dispatcher, forgotten (it is released)."""
        entry = self._kept.pop(slot_id, None)
        self._kept_at.pop(slot_id, None)
        return None if entry is None else entry[0]

    def _take_turn(self, key: tuple[str, bool]) -> int:
        returned = self._returned_turns.get(key)
        if returned:
            return returned.pop()
        turn = self._turns.get(key, 0)
        self._turns[key] = turn + 1
        return turn

    async def try_reserve(
        self,
        model: str,
        holder: str,
        external: bool,
        exclude: set[str] | frozenset[str] = frozenset(),
        allow_cold: bool = True,
        role: str | None = None,
    ) -> SlotGrant | None:
        """A slot on the best instance that can run ``model`` now; with ``allow_cold``
        false, only where the model is already loaded (when it is loaded anywhere). Only
        instances serving ``role`` (default: the role learned for the model) qualify."""
        self._forget_stale()
        instances = self._lane(external)
        if not instances:
            return None
        role = role or self.model_roles.get(model)
        # This replica's view, however old, ranks the instances (watch_usage reads what
        # other replicas did in the background); Redis is asked only the first time.
        self._routed.add((model, external))
        usage = self.slots.known_usage(instances, model)
        if usage is None:
            usage = await self.slots.usage(instances, model)
        candidates = self.registry.candidates(model, usage, external, exclude, role=role)
        if not any(routing.eligible(c) for c in candidates):
            # Looked full: slots freed through other replicas are seen at the poll's pace.
            usage = await self.slots.recent_usage(instances, model, POLL_SECONDS)
            candidates = self.registry.candidates(model, usage, external, exclude, role=role)
        turn_key = (model, external)
        turn: int | None = None
        if self.strategy is routing.Strategy.WEIGHTED_ROUND_ROBIN and any(
            routing.eligible(c) for c in candidates
        ):
            # Taken before the awaits below, so concurrent Reserves get successive turns.
            turn = self._take_turn(turn_key)
        ranked = routing.rank(candidates, self.strategy, rotation=turn or 0, external=external)
        if not allow_cold and any(c.model_loaded and c.healthy for c in candidates):
            ranked = [c for c in ranked if c.model_loaded]
        for choice in ranked:
            grant = await self._grant_on(choice.instance, model, holder, external)
            if grant is not None:
                if turn is not None:
                    self._grant_turns[grant.id] = (turn_key, turn)
                return grant
        if turn is not None:
            self._returned_turns.setdefault(turn_key, []).append(turn)
        return None

    def _lane(self, external: bool) -> list[str]:
        """The instances of the local fleet, or of the external providers."""
        return [s.id for s in self.registry.instances.values() if s.spec.external == external]

    async def watch_usage(self, stop: asyncio.Event) -> None:
        """Read the slot counts of the models routed lately again when they are older than
        USAGE_MAX_AGE_SECONDS, so other replicas' grants and releases reach this replica's
        routing without a read on any request's path. Nothing is read while idle."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), USAGE_MAX_AGE_SECONDS)
            routed, self._routed = self._routed, set()
            for model, external in routed:
                instances = self._lane(external)
                try:
                    if instances:
                        await self.slots.recent_usage(instances, model)
                except Exception as exc:  # Redis away: routing keeps the last counts
                    log.warning("slot counts not read", error=str(exc))

    async def _grant_on(
        self, instance: str, model: str, holder: str, external: bool
    ) -> SlotGrant | None:
        """A slot on ``instance`` for ``model`` if its circuits admit a call and a slot is
        free. A half-open circuit admits only its trial calls: the grant takes one, given
        back when the slot is released without a verdict."""
        state = self.registry.instances.get(instance)
        if state is None:
            return None
        trials = self._admit(state, model)
        if trials is None:
            return None
        limit = state.spec.concurrent_calls
        grant = await self.slots.try_reserve(
            instance,
            model,
            self.registry.slots_for(state, model),
            limit if state.spec.max_loaded_models else 0,
            holder,
            request_pb2.ROUTE_EXTERNAL if external else request_pb2.ROUTE_LOCAL,
        )
        if grant is None:
            _give_back(trials)
            return None
        self._remember(grant)
        if trials:
            self._trials[grant.id] = trials
        return grant

    def _admit(self, state: InstanceState, model: str) -> list[CircuitBreaker] | None:
        """The half-open breakers whose trial a call to (instance, model) takes now, or
        None when a circuit refuses the call."""
        now = time.monotonic()
        breakers = [state.circuit, state.model_circuit(model, self.registry.new_circuit)]
        trials = [b for b in breakers if b.state(now) is CircuitState.HALF_OPEN]
        return trials if admit_all(breakers, now) else None

    def settle_trial(self, slot_id: str) -> None:
        """The call on this slot got its verdict (success or failure was recorded)."""
        self._trials.pop(slot_id, None)

    def release_trial(self, slot_id: str) -> None:
        """The slot ends without a verdict: its half-open trials are free again."""
        _give_back(self._trials.pop(slot_id, []))

    async def reserve(
        self, models: list[str], holder: str, external: bool, wait: float
    ) -> SlotGrant | None:
        began = time.monotonic()
        deadline = began + wait
        start = next(self._model_turn)
        while True:
            # A load costs seconds; a warm slot usually frees sooner. So for a short grace
            # period only instances that have the model loaded are taken (when any has it);
            # spreading a busy model wider is placement's job (scale-out on queue length).
            allow_cold = self.strategy != routing.Strategy.AFFINITY or (
                time.monotonic() - began >= AFFINITY_GRACE_SECONDS
            )
            # Rotate which model is tried first so one busy model cannot shadow the others.
            for i in range(len(models)):
                model = models[(start + i) % len(models)]
                grant = await self.try_reserve(model, holder, external, allow_cold=allow_cold)
                if grant is not None:
                    return grant
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            # Slots kept for other models' next requests make way for these, and so do
            # slots of these models kept a while: their dispatchers wait for a request
            # that went elsewhere (another Scheduler replica); one with work is back at once.
            self._release_kept(lambda grant: grant.model in models and self._kept_lately(grant))
            # Slots freed through other replicas are found by polling.
            await self._waiting.wait(frozenset(models), min(POLL_SECONDS, remaining))

    def release(self, grant: SlotGrant) -> asyncio.Future[bool]:
        """Free ``grant``; once Redis has it, a Reserve waiting here is woken."""
        released = self.slots.release(grant)

        def wake(_: asyncio.Future[bool]) -> None:
            # The oldest waiter for this model; else the oldest at all (a freed slot can
            # make room on its instance for another model).
            if not self._waiting.wake_first(lambda models: grant.model in models):
                self._waiting.wake_first()

        released.add_done_callback(wake)
        return released


class _RunLimit:
    """A request's run-time limit over its model server's events (``next``): when the
    loop's clock reaches ``deadline`` the call is closed (the pending read is cancelled,
    which closes the HTTP response) and the request ends with DEADLINE_EXCEEDED. Only the
    reads wait under the timer, never a consumer holding an event. One timer for the whole
    answer, not one per event: it cancels a read under way, or marks the answer for the
    next read. A plain object, not a generator wrapped around the events: each token
    passes through one layer less."""

    __slots__ = ("_expired", "_limit", "_reading", "_timer")

    def __init__(self, deadline: float, limit: float) -> None:
        self._limit = limit
        self._expired = False
        self._reading: asyncio.Task[Any] | None = None
        self._timer = asyncio.get_running_loop().call_at(deadline, self._expire)

    def _expire(self) -> None:
        self._expired = True
        if self._reading is not None:
            self._reading.cancel()

    def _exceeded(self) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"the request ran longer than its run-time limit of {self._limit:g}s; "
            "the model server's call was closed"
        )

    async def next(self, events: AsyncIterator[Event]) -> Event | None:
        """The next event; None at the end."""
        if self._expired:
            raise self._exceeded()
        task = self._reading = asyncio.current_task()
        try:
            return await events.__anext__()
        except StopAsyncIteration:
            return None
        except asyncio.CancelledError:
            # The timer's cancel (and no other) ends the answer as its limit.
            if self._expired and task is not None and task.uncancel() == 0:
                raise self._exceeded() from None
            raise
        finally:
            self._reading = None

    def stop(self) -> None:
        self._timer.cancel()


def _first_token(measured: float | None, done: Done) -> float | None:
    """Time to the first token: as measured, else (an answer read whole) the server's load
    and prompt time, else (an embedding) the whole call's; None when nothing says."""
    if measured is not None:
        return measured
    if done.completion_tokens == 0:
        return done.total_seconds
    return (done.load_seconds + done.prompt_seconds) or None


def _grant_or_none(slot_id: str) -> SlotGrant | None:
    """The grant a slot id describes, None when it describes none."""
    try:
        return grant_of(slot_id)
    except ValueError:
        return None


def _give_back(trials: list[CircuitBreaker]) -> None:
    now = time.monotonic()
    for breaker in trials:
        breaker.release(now)


def request_role(request: pool_pb2.GenerateRequest) -> str:
    """The instance role a request needs: embeddings go to embedding hosts, the rest to chat."""
    return ROLE_EMBEDDING if request.WhichOneof("input") == "embed" else ROLE_CHAT


def _require(principal: Principal, *roles: str) -> None:
    if principal.is_admin or any(role in principal.roles for role in roles):
        return
    raise PermissionDenied(f"this method needs the {' or '.join(roles)} role")


def _slot_proto(grant: SlotGrant, lease_ms: int) -> pool_pb2.Slot:
    slot = pool_pb2.Slot(id=grant.id, model=grant.model, instance=grant.instance)
    slot.route = grant.route  # type: ignore[assignment]
    slot.expires_at.FromMilliseconds(int(time.time() * 1000) + lease_ms)
    return slot


def _renamed(request: pool_pb2.GenerateRequest, name: str) -> pool_pb2.GenerateRequest:
    """``request`` for the model server's ``name`` of its model (a fallback model, or a
    provider's name): a copy when that differs."""
    if name == request.model:
        return request
    renamed = pool_pb2.GenerateRequest()
    renamed.CopyFrom(request)
    renamed.model = name
    return renamed


class _BatchDue:
    """Tokens held for their batch are due before the model server's next event."""


BATCH_DUE = _BatchDue()


class _Reader:
    """The model server's events under the run-time limit (``_RunLimit``). While tokens
    wait for their batch (``_TokenBatch``), the next event is read ahead, and
    ``BATCH_DUE`` comes first when the batch is due before it: a model server that pauses
    after a token (a tool call, a stall) must not hold that token back until it goes on.
    Otherwise the read is awaited in place: no task per event."""

    __slots__ = ("_ahead", "_events", "_run_limit")

    def __init__(self, run_limit: _RunLimit, events: AsyncIterator[Event]) -> None:
        self._run_limit = run_limit
        self._events = events
        self._ahead: asyncio.Future[Event | None] | None = None

    async def next(self, batch: _TokenBatch) -> Event | _BatchDue | None:
        """The next event (None at the end), or BATCH_DUE."""
        if batch.pending:
            if self._ahead is None:
                self._ahead = asyncio.ensure_future(self._run_limit.next(self._events))
            due = batch.due_in(time.monotonic())
            if due > 0:
                await asyncio.wait({self._ahead}, timeout=due)
            if not self._ahead.done():
                return BATCH_DUE
        if self._ahead is not None:
            ahead, self._ahead = self._ahead, None
            return await ahead
        return await self._run_limit.next(self._events)

    async def __aenter__(self) -> _Reader:
        return self

    async def __aexit__(self, *_: object) -> None:
        """A read ahead under way ends (the caller went away): before the events close."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.cancel()
            await asyncio.wait({ahead})
            if not ahead.cancelled():
                ahead.exception()  # a read that failed as it ended: nobody waits for it now


class _TokenBatch:
    """Token deltas on their way to the dispatcher, one message per COALESCE_SECONDS (a
    message per token costs more than the token is worth): a delta that comes sooner after
    the last message waits for the next ones, until the batch is due (``due_in``); one
    with more than text goes at once."""

    __slots__ = ("_last_sent", "pending")

    def __init__(self, started: float) -> None:
        self.pending: list[Delta] = []
        self._last_sent = started

    def add(self, delta: Delta, now: float) -> pool_pb2.GenerateResponse | None:
        """The message to send now, if the batch is due with ``delta``."""
        self.pending.append(delta)
        if delta.message or now - self._last_sent >= COALESCE_SECONDS:
            return self.take(now)
        return None

    def due_in(self, now: float) -> float:
        return self._last_sent + COALESCE_SECONDS - now

    def take(self, now: float) -> pool_pb2.GenerateResponse:
        message = _delta(self.pending)
        self.pending, self._last_sent = [], now
        return message


def _delta(batch: list[Delta]) -> pool_pb2.GenerateResponse:
    """One message for several token deltas (the last one's non-text part, if any). Filled
    in place: a TokenDelta built apart is copied into its response (a message per read
    of the model server: 2.6 -> 1.0 us)."""
    response = pool_pb2.GenerateResponse()
    delta = response.delta
    delta.text = batch[0].text if len(batch) == 1 else "".join(d.text for d in batch)
    delta.completion_tokens = batch[-1].completion_tokens
    message = _struct(batch[-1].message)
    if message is not None:
        delta.message.CopyFrom(message)
    return response


def _struct(value: dict[str, Any] | None) -> struct_pb2.Struct | None:
    return dict_to_struct(value) if value else None


def public_error(error: UpstreamError, state: InstanceState) -> str:
    """An upstream failure as callers may read it: the instance named by its id, never by
    the model server's address (the log line keeps that)."""
    return str(error).replace(state.upstream.base_url, f"[{state.id}]")


def status_of(
    state: InstanceState, active: int = 0, *, privileged: bool = True
) -> pool_pb2.InstanceStatus:
    """An instance as ListInstances shows it; callers without the admin or service role
    see no addresses, key variable names or error texts (which quote addresses)."""
    now = time.monotonic()
    status = pool_pb2.InstanceStatus(
        config=state.spec.to_proto(),
        health=pool_pb2.INSTANCE_HEALTH_HEALTHY
        if state.healthy
        else pool_pb2.INSTANCE_HEALTH_UNHEALTHY,
        circuit=state.circuit.state(now).to_proto(),
        draining=state.draining,
        active=active,
        parallel=state.spec.parallel,
        recent_error_rate=state.error_rate,
        last_error=state.last_error,
        available_models=sorted(state.available),
    )
    status.config.weight = state.weight
    for model, circuit in state.model_circuits.items():
        status.model_circuits[model] = circuit.state(now).to_proto()
    for info in state.loaded.values():
        loaded = status.loaded.add(
            name=info.name,
            size_bytes=info.size_bytes,
            size_vram_bytes=info.size_vram_bytes,
            context_length=info.context_length,
        )
        if info.expires_at is not None:
            loaded.expires_at.FromDatetime(info.expires_at)
    if state.latency is not None:
        status.recent_latency.CopyFrom(duration_from_seconds(state.latency))
    if state.last_checked:
        status.last_checked.FromMilliseconds(int(state.last_checked * 1000))
    if not privileged:
        status.config.base_url = ""
        status.config.api_key_env = ""
        status.last_error = "unreachable" if state.last_error else ""
    return status


class PoolServicer(pool_pb2_grpc.PoolServiceServicer):
    def __init__(
        self,
        router: FleetRouter,
        stats: PoolStats,
        auth: Authenticator,
        settings: PoolSettings,
    ) -> None:
        self.router = router
        self.registry = router.registry
        self.stats = stats
        self.auth = auth
        self.settings = settings

    def caller(self, context: Context) -> Principal:
        return self.auth.authenticate(context.invocation_metadata())

    async def Reserve(
        self, request: pool_pb2.ReserveRequest, context: Context
    ) -> pool_pb2.ReserveResponse:
        _require(self.caller(context), SERVICE_ROLE)
        if not request.models:
            raise InvalidArgument([FieldViolation("models", "name at least one model")])
        wait = (
            request.wait.ToMilliseconds() / 1000
            if request.HasField("wait")
            else DEFAULT_WAIT_SECONDS
        )
        if not 0 <= wait <= MAX_WAIT_SECONDS:
            raise InvalidArgument([FieldViolation("wait", f"must be 0-{MAX_WAIT_SECONDS:.0f}s")])
        remaining = context.time_remaining()
        if remaining is not None:
            wait = max(0.0, min(wait, remaining - 0.2))
        external = request.route == request_pb2.ROUTE_EXTERNAL
        grant = None
        if request.reuse_slot_id:
            grant = self.router.reuse(request.reuse_slot_id, list(request.models), external)
        if grant is None:
            grant = await self.router.reserve(list(request.models), request.holder, external, wait)
        if grant is None:
            return pool_pb2.ReserveResponse()
        return pool_pb2.ReserveResponse(slot=_slot_proto(grant, self.router.slots.lease_ms))

    async def Release(
        self, request: pool_pb2.ReleaseRequest, context: Context
    ) -> pool_pb2.ReleaseResponse:
        _require(self.caller(context), SERVICE_ROLE)
        grant = self.router.take_kept(request.slot_id)
        if grant is None:
            grant, _ = await self._lookup(request.slot_id, used=False)
        self.router.release_trial(request.slot_id)
        if grant is not None:
            await self.router.release(grant)
        return pool_pb2.ReleaseResponse()

    async def _lookup(
        self, slot_id: str, *, used: bool = True
    ) -> tuple[SlotGrant, float] | tuple[None, None]:
        """A held slot, with when its lease was set (monotonic; now when read from Redis);
        (None, None) when it is no longer held."""
        granted = self.router.take_granted(slot_id, used=used)
        if granted[0] is not None:
            return granted
        try:
            found = await self.router.slots.lookup(slot_id)
            return (None, None) if found is None else (found, time.monotonic())
        except ValueError:
            raise InvalidArgument(
                [FieldViolation("slot_id", f"{slot_id[:60]!r} is not a slot id")]
            ) from None

    async def Generate(
        self, request: pool_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[pool_pb2.GenerateResponse]:
        _require(self.caller(context), SERVICE_ROLE)
        if request.WhichOneof("input") is None:
            raise InvalidArgument(
                [FieldViolation("input", "one of chat, generate or embed is required")]
            )
        slot_id = request.slot_id
        if request.reuse_kept_slot:
            slot_id = await self._kept_or_reserved(request, context)
        grant, renewed_at = await self._lookup(slot_id)
        if grant is None:
            raise FailedPrecondition(f"slot {slot_id} expired or was released; reserve again")
        if grant.model != request.model:
            raise InvalidArgument(
                [FieldViolation("model", f"slot {grant.id} is for {grant.model}")]
            )
        self.router.slots.hold(grant, renewed_at)  # its lease is renewed while it runs
        held = [grant]
        began = asyncio.get_running_loop().time()
        released: list[asyncio.Future[bool]] | None = None
        try:
            async for event in self._run_with_failover(request, held, began):
                if event.HasField("done"):
                    # The model server is done: its slots go back beside the answer, not
                    # once the caller has read on to the end of the stream (an in-process
                    # caller that stops at the answer never does), so the next request can
                    # start while this one is being finished. Or the one slot stays held
                    # for the caller's next request of the model (keep_slot).
                    # (Not a slot reserved in place of a kept one: the caller knows its id.)
                    if (
                        request.keep_slot
                        and held == [grant]
                        and grant.id == request.slot_id
                        and self.router.keep(grant)
                    ):
                        event.done.slot_kept = True
                        released = []
                    else:
                        released = self._release_held(held)
                yield event
        finally:
            for release in self._release_held(held) if released is None else released:
                await release  # a caller that reads to the end sees them released

    async def _kept_or_reserved(self, request: pool_pb2.GenerateRequest, context: Context) -> str:
        """The slot a Generate given a kept slot runs on: that one when a Reserve with
        reuse_slot_id would grant it again, else (it released) one reserved now."""
        kept = _grant_or_none(request.slot_id)
        if kept is None:
            raise InvalidArgument(
                [FieldViolation("slot_id", f"{request.slot_id[:60]!r} is not a slot id")]
            )
        external = kept.route == request_pb2.ROUTE_EXTERNAL
        grant = self.router.reuse(request.slot_id, [request.model], external)
        if grant is None:
            remaining = context.time_remaining()
            wait = DEFAULT_WAIT_SECONDS
            if remaining is not None:
                wait = max(0.0, min(wait, remaining - 0.2))
            grant = await self.router.reserve([request.model], kept.holder, external, wait)
            if grant is None:
                raise FailedPrecondition(f"no slot for {request.model} freed in time; retry")
        return grant.id

    async def GenerateWhole(
        self, request: pool_pb2.GenerateWholeRequest, context: Context
    ) -> pool_pb2.GenerateWholeResponse:
        inner = request.request
        inner.stream = False
        done: pool_pb2.GenerationDone | None = None
        async for event in self.Generate(inner, context):
            if event.HasField("done"):
                done = event.done
        if done is None:
            raise Unavailable(f"no answer for {inner.request_id}")
        return pool_pb2.GenerateWholeResponse(done=done)

    def _release_held(self, held: list[SlotGrant]) -> list[asyncio.Future[bool]]:
        """Release every slot the request took (failover may have taken several)."""
        releases = []
        for slot in held:
            self.router.release_trial(slot.id)
            releases.append(self.router.release(slot))
        return releases

    async def _run_with_failover(
        self, request: pool_pb2.GenerateRequest, held: list[SlotGrant], began: float
    ) -> AsyncIterator[pool_pb2.GenerateResponse]:
        """Run on the granted instance; before the first token, fail over to another instance,
        then down the model's fallback chain. After it, an error ends the stream cleanly."""
        grant = held[0]
        external = grant.route == request_pb2.ROUTE_EXTERNAL
        chain = [request.model, *self.settings.fallback_chain(request.model)]
        role = request_role(request)
        self.router.model_roles[request.model] = role
        tried: set[str] = set()
        last_error = "no instance could run the request"
        for model in chain:
            current: SlotGrant | None = grant if model == request.model else None
            while True:
                if current is None:
                    current = await self.router.try_reserve(
                        model, grant.holder, external, tried, role=role
                    )
                    if current is None:
                        break
                    held.append(current)
                    self.router.slots.hold(current)
                tried.add(current.instance)
                state = self.registry.instances.get(current.instance)
                if state is None or not state.spec.serves_role(role):
                    # Granted before this model's role was known here: run it on a host
                    # of the right role (chat vs embedding) instead.
                    current = None
                    continue
                try:
                    async for event in self._stream(state, model, request, current, began):
                        yield event
                    return
                except ModelNotFound as error:
                    last_error = public_error(error, state)
                    current = None
                    continue
                except UpstreamError as error:
                    if not error.before_first_token:
                        raise UpstreamFailed(
                            f"model server {state.id} failed mid-answer: "
                            f"{public_error(error, state)}"
                        ) from error
                    last_error = public_error(error, state)
                    if error.status is None:
                        self.registry.mark_unreachable(state, str(error))
                    log.warning("failing over", instance=state.id, model=model, error=str(error))
                    current = None
            tried.clear()
        await self.stats.record_failure(request.model)
        raise Unavailable(f"no instance could run {request.model}: {last_error}")

    async def _stream(
        self,
        state: InstanceState,
        model: str,
        request: pool_pb2.GenerateRequest,
        grant: SlotGrant,
        began: float,
    ) -> AsyncIterator[pool_pb2.GenerateResponse]:
        requested = request.timeout.ToMilliseconds() / 1000 if request.HasField("timeout") else 0
        limit = self.settings.run_time_limit(state.spec, requested)
        name = self.settings.external_models.get(model, model) if state.spec.external else model
        upstream_request = _renamed(request, name)
        started_at = time.monotonic()
        first_token: float | None = None
        sent_started = False
        batch = _TokenBatch(started_at)
        run_limit = _RunLimit(began + limit, limit)
        try:
            async with (
                contextlib.aclosing(
                    state.upstream.generate(
                        upstream_request,
                        keep_alive_seconds=self.settings.keep_alive_for(
                            state.spec, model, state.held_for(model, time.time())
                        ),
                        traceparent=request.traceparent,
                        whole=not request.stream,
                    )
                ) as events,
                _Reader(run_limit, events) as reader,  # stops before the events close
            ):
                while (event := await reader.next(batch)) is not None:
                    if event is BATCH_DUE:
                        yield batch.take(time.monotonic())
                    elif isinstance(event, Started):
                        if not request.stream:
                            continue  # a caller of the result alone hears only of that
                        sent_started = True
                        yield pool_pb2.GenerateResponse(
                            started=pool_pb2.GenerationStarted(
                                instance=state.id, model=model, loaded_model=event.loaded_model
                            )
                        )
                    elif isinstance(event, Delta):
                        if first_token is None:
                            first_token = time.monotonic() - started_at
                        if request.stream and (message := batch.add(event, time.monotonic())):
                            yield message
                    elif isinstance(event, Done):
                        if batch.pending:
                            yield batch.take(time.monotonic())
                        if request.stream and not sent_started:
                            yield pool_pb2.GenerateResponse(
                                started=pool_pb2.GenerationStarted(instance=state.id, model=model)
                            )
                        self.registry.record(state, model, True, _first_token(first_token, event))
                        self.router.settle_trial(grant.id)
                        # Batched: neither the answer nor the slot's release (and with it
                        # the next request) waits for the fleet statistics.
                        self.stats.record_done(model, event)
                        yield pool_pb2.GenerateResponse(done=self._done(event, model, state.id))
        except UpstreamError as error:
            if status_is_retryable(error.status):
                # The instance's fault (down, overloaded, 5xx): its circuits count it. A
                # request another instance would refuse too (4xx) says nothing about it.
                self.registry.record(state, model, False, None)
                self.router.settle_trial(grant.id)
            if batch.pending and not error.before_first_token:
                # What was generated before the failure still counts.
                yield batch.take(time.monotonic())
            raise
        finally:
            run_limit.stop()

    @staticmethod
    def _done(event: Done, model: str, instance: str) -> pool_pb2.GenerationDone:
        result = request_pb2.RequestResult(
            text=event.text,
            done_reason=event.done_reason,
            served_by_model=model,
            served_by_instance=instance,
        )
        message = _struct(event.message)
        if message is not None:
            result.message.CopyFrom(message)
        for vector in event.embeddings:
            result.embeddings.add(values=vector)
        usage = request_pb2.Usage(
            prompt_tokens=event.prompt_tokens,
            completion_tokens=event.completion_tokens,
            tokens_per_second=(
                event.completion_tokens / event.eval_seconds if event.eval_seconds > 0 else 0.0
            ),
        )
        usage.processing.CopyFrom(duration_from_seconds(event.total_seconds))
        usage.load.CopyFrom(duration_from_seconds(event.load_seconds))
        return pool_pb2.GenerationDone(result=result, usage=usage)

    async def ListInstances(
        self, request: pool_pb2.ListInstancesRequest, context: Context
    ) -> pool_pb2.ListInstancesResponse:
        caller = self.caller(context)
        privileged = caller.is_admin or SERVICE_ROLE in caller.roles
        states = list(self.registry.instances.values())
        usage = await self.router.slots.usage([s.id for s in states], "")
        return pool_pb2.ListInstancesResponse(
            instances=[
                status_of(s, usage[s.id].total_active, privileged=privileged) for s in states
            ]
        )

    async def GetModelStats(
        self, request: pool_pb2.GetModelStatsRequest, context: Context
    ) -> pool_pb2.GetModelStatsResponse:
        self.caller(context)
        return pool_pb2.GetModelStatsResponse(
            stats=await self.stats.model_stats(
                list(request.models), self.registry, self.router.slots
            )
        )


class PoolAdminServicer(pool_pb2_grpc.PoolAdminServiceServicer):
    def __init__(self, registry: Registry, auth: Authenticator) -> None:
        self.registry = registry
        self.auth = auth

    def admin(self, context: Context) -> None:
        self.auth.authenticate(context.invocation_metadata()).require_admin()

    def known(self, instance_id: str) -> InstanceState:
        state = self.registry.instances.get(instance_id)
        if state is None:
            raise NotFound(f"no instance {instance_id!r}")
        return state

    def loads_its_models(self, instance_id: str) -> InstanceState:
        """The instance, if its models are loaded and unloaded through the Pool (Ollama's
        API); an OpenAI-compatible server decides that itself, so a load there would do
        nothing and say it did."""
        state = self.known(instance_id)
        if state.spec.kind != KIND_OLLAMA:
            raise FailedPrecondition(
                f"{state.id} is an OpenAI-compatible server: it loads and unloads its models itself"
            )
        return state

    async def RegisterInstance(
        self, request: pool_pb2.RegisterInstanceRequest, context: Context
    ) -> pool_pb2.RegisterInstanceResponse:
        self.admin(context)
        try:
            spec = InstanceSpec.from_proto(request.config)
        except ConfigError as error:
            raise InvalidArgument([FieldViolation("config", str(error))]) from None
        if request.config.memory_budget_bytes and not spec.placed:
            # from_proto drops it there, for registrations stored before this rule.
            raise InvalidArgument([FieldViolation("config.memory_budget_bytes", NOT_PLACED)])
        state = await self.registry.register(spec)
        return pool_pb2.RegisterInstanceResponse(instance=status_of(state))

    async def DeregisterInstance(
        self, request: pool_pb2.DeregisterInstanceRequest, context: Context
    ) -> pool_pb2.DeregisterInstanceResponse:
        self.admin(context)
        if not await self.registry.deregister(request.id):
            raise NotFound(f"no instance {request.id!r}")
        return pool_pb2.DeregisterInstanceResponse()

    async def DrainInstance(
        self, request: pool_pb2.DrainInstanceRequest, context: Context
    ) -> pool_pb2.DrainInstanceResponse:
        self.admin(context)
        self.known(request.id)
        await self.registry.set_draining(request.id, request.drain)
        return pool_pb2.DrainInstanceResponse(instance=status_of(self.known(request.id)))

    async def SetInstanceWeight(
        self, request: pool_pb2.SetInstanceWeightRequest, context: Context
    ) -> pool_pb2.SetInstanceWeightResponse:
        self.admin(context)
        self.known(request.id)
        if not request.weight > 0:
            raise InvalidArgument([FieldViolation("weight", "must be positive")])
        await self.registry.set_weight(request.id, request.weight)
        return pool_pb2.SetInstanceWeightResponse(instance=status_of(self.known(request.id)))

    async def ResetCircuit(
        self, request: pool_pb2.ResetCircuitRequest, context: Context
    ) -> pool_pb2.ResetCircuitResponse:
        self.admin(context)
        state = self.known(request.id)
        if request.model:
            circuit = state.model_circuits.get(request.model)
            if circuit is not None:
                circuit.reset()
        else:
            state.circuit.reset()
            for circuit in state.model_circuits.values():
                circuit.reset()
        return pool_pb2.ResetCircuitResponse(instance=status_of(state))

    async def LoadModel(
        self, request: pool_pb2.LoadModelRequest, context: Context
    ) -> pool_pb2.LoadModelResponse:
        self.admin(context)
        state = self.loads_its_models(request.id)
        # Held this long (< 0: until UnloadModel): placement keeps it loaded as a preload,
        # and every call to it asks the server to keep it at least that long.
        held_for = request.keep_alive.ToMilliseconds() / 1000
        if request.HasField("keep_alive") and held_for == 0:
            raise InvalidArgument([FieldViolation("keep_alive", "must not be 0 (UnloadModel)")])
        keep_alive = self.registry.settings.keep_alive_for(state.spec, request.model, held_for)
        try:
            await state.upstream.load(request.model, keep_alive_seconds=keep_alive)
        except UpstreamError as error:
            raise Unavailable(
                f"{state.id} could not load {request.model}: {public_error(error, state)}"
            ) from None
        if held_for:
            await self.registry.hold(state.id, request.model, held_for)
        await self.registry.check(state)
        return pool_pb2.LoadModelResponse(instance=status_of(state))

    async def UnloadModel(
        self, request: pool_pb2.UnloadModelRequest, context: Context
    ) -> pool_pb2.UnloadModelResponse:
        self.admin(context)
        state = self.loads_its_models(request.id)
        await self.registry.hold(state.id, request.model, 0)  # let go: unloaded by hand
        try:
            await state.upstream.unload(request.model)
        except UpstreamError as error:
            raise Unavailable(
                f"{state.id} could not unload {request.model}: {public_error(error, state)}"
            ) from None
        await self.registry.check(state)
        return pool_pb2.UnloadModelResponse(instance=status_of(state))

    async def PullModel(
        self, request: pool_pb2.PullModelRequest, context: Context
    ) -> AsyncIterator[pool_pb2.PullModelResponse]:
        self.admin(context)
        if not request.model.strip():
            raise InvalidArgument([FieldViolation("model", "name the model to pull")])
        if request.id:
            targets = [self.known(request.id)]
        else:
            targets = [s for s in self.registry.instances.values() if s.spec.placed and s.healthy]
        if not targets:
            raise FailedPrecondition("no healthy Ollama instance to pull onto")
        progress: asyncio.Queue[pool_pb2.PullModelResponse | None] = asyncio.Queue()
        failures: list[str] = []

        async def pull_on(state: InstanceState) -> None:
            try:
                async for step in state.upstream.pull(request.model):
                    progress.put_nowait(
                        pool_pb2.PullModelResponse(
                            instance=state.id,
                            status=step.status,
                            digest=step.digest,
                            total=step.total,
                            completed=step.completed,
                        )
                    )
                await self.registry.check(state)  # the model is listed there now
            except UpstreamError as error:
                failures.append(f"{state.id}: {public_error(error, state)}")
            finally:
                progress.put_nowait(None)

        # Every instance pulls at once; their lines are streamed as they come.
        tasks = [asyncio.create_task(pull_on(state)) for state in targets]
        try:
            running = len(tasks)
            while running:
                item = await progress.get()
                if item is None:
                    running -= 1
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.registry.publish_capacity()
        if failures:
            raise Unavailable(f"could not pull {request.model} onto " + "; ".join(failures))
