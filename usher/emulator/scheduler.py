"""The emulator's model scheduler: a small model of what Ollama's ``server/sched.go``
does, independent of HTTP.

* A loaded model ("runner") has ``parallel`` slots; requests beyond that wait in
  FIFO order (per model, and globally for loads).
* Loading is serialised (one model loads at a time, others wait behind it), costs
  ``load_time`` and must fit both ``max_loaded_models`` and the memory budget;
  to make room the least-recently-used idle model is unloaded, or, if all are
  busy, the LRU one is drained (no new requests) and then unloaded.
* A request asking for a different ``num_ctx`` than the loaded runner's forces a
  reload, like Ollama's ``needsReload``.
* When a runner goes idle its keep-alive timer starts; expiry unloads it.
  ``keep_alive: 0`` unloads as soon as it is idle; negative keeps it forever.
* More than ``max_queue`` waiting requests get ``QueueFullError`` (HTTP 503).

Differences from Ollama, on purpose: the eviction victim is the idle LRU model
(Ollama sorts by keep-alive then name) and, with ``max_queue_scope="all"``, slot
waits count toward ``max_queue`` (Ollama only bounds requests that need a load).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime

from usher.emulator.config import EmulatorConfig, ModelSpec
from usher.emulator.durations import expires_at, human_bytes2, utcnow
from usher.emulator.stats import EmulatorStats

__all__ = [
    "MAX_QUEUE_MESSAGE",
    "Lease",
    "LoadedModel",
    "ModelLoadError",
    "QueueFullError",
    "Scheduler",
    "SchedulerClosedError",
]

#: Ollama's ``ErrMaxQueue`` text (note the two spaces).
MAX_QUEUE_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"


class QueueFullError(Exception):
    """Too many waiting requests (HTTP 503)."""

    def __init__(self) -> None:
        super().__init__(MAX_QUEUE_MESSAGE)


class ModelLoadError(Exception):
    """The model cannot be loaded (e.g. larger than the whole memory budget)."""


class SchedulerClosedError(Exception):
    """The instance shut down (or crashed) while the request waited."""


@dataclass(eq=False)
class _Runner:
    spec: ModelSpec
    num_ctx: int
    parallel: int
    memory: int
    session: float  # keep-alive in seconds; 0: unload when idle; inf: never
    last_used: float
    refs: int = 0  # every lease, including load-only requests
    busy: int = 0  # leases holding a generation slot
    evicting: bool = False  # being drained for an eviction or reload: no new leases
    timer: asyncio.TimerHandle | None = None
    expires: datetime | None = None
    idle: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(eq=False)
class _Waiter:
    spec: ModelSpec
    num_ctx: int
    keep_alive: float | None
    slot: bool
    future: asyncio.Future[Lease]


@dataclass(eq=False)
class Lease:
    """A granted request: the model is loaded, and a slot is held if ``slot``."""

    model: str
    num_ctx: int
    slot: bool
    _runner: _Runner
    released: bool = False


@dataclass(frozen=True)
class LoadedModel:
    """Snapshot of one loaded model, as /api/ps reports it."""

    spec: ModelSpec
    num_ctx: int
    size: int
    size_vram: int
    expires_at: datetime
    busy: int
    parallel: int


class Scheduler:
    """Slots, loads, evictions and keep-alive timers of one emulated instance."""

    def __init__(self, config: EmulatorConfig, stats: EmulatorStats) -> None:
        self._config = config
        self._stats = stats
        self._runners: dict[str, _Runner] = {}
        self._waiters: list[_Waiter] = []
        self._load_task: asyncio.Task[None] | None = None
        self._closed = False

    # -- public API ---------------------------------------------------------

    async def acquire(
        self,
        spec: ModelSpec,
        *,
        num_ctx: int,
        keep_alive: float | None,
        slot: bool = True,
    ) -> Lease:
        """Wait until ``spec`` is loaded with ``num_ctx`` (and a slot is free if
        ``slot``). ``keep_alive`` (seconds) replaces the runner's keep-alive when
        given. Raises ``QueueFullError``, ``ModelLoadError``, ``SchedulerClosedError``."""
        if self._closed:
            raise SchedulerClosedError("scheduler closed")
        loop = asyncio.get_running_loop()
        waiter = _Waiter(spec, num_ctx, keep_alive, slot, loop.create_future())
        runner = self._usable(spec, num_ctx)
        if runner is not None and (not slot or self._slot_free(runner, spec.name)):
            return self._grant(waiter, runner)
        if self._queue_full(needs_load=runner is None):
            self._stats.requests_rejected += 1
            raise QueueFullError()
        self._waiters.append(waiter)
        self._stats.set_queue_depth(len(self._waiters))
        self._pump()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            # The client went away while waiting: give back whatever we got.
            if waiter.future.done() and not waiter.future.cancelled():
                if waiter.future.exception() is None:
                    self.release(waiter.future.result())
            else:
                waiter.future.cancel()
                self._remove_waiter(waiter)
            self._pump()
            raise

    def release(self, lease: Lease) -> None:
        """Return a lease; starts the keep-alive countdown when the model goes idle."""
        if lease.released:
            return
        lease.released = True
        runner = lease._runner
        runner.refs -= 1
        if lease.slot:
            runner.busy -= 1
            self._stats.finished(runner.spec.name)
        runner.last_used = time.monotonic()
        if runner.refs == 0:
            runner.idle.set()
            if self._runners.get(runner.spec.name) is runner and not runner.evicting:
                self._on_idle(runner)
        self._pump()

    @contextlib.asynccontextmanager
    async def lease(
        self, spec: ModelSpec, *, num_ctx: int, keep_alive: float | None, slot: bool = True
    ) -> AsyncIterator[Lease]:
        """``async with scheduler.lease(...)``: acquire, then always release."""
        granted = await self.acquire(spec, num_ctx=num_ctx, keep_alive=keep_alive, slot=slot)
        try:
            yield granted
        finally:
            self.release(granted)

    def expire(self, name: str) -> None:
        """Explicit unload (empty prompt with ``keep_alive: 0``): unload now if idle,
        otherwise as soon as the running requests finish."""
        runner = self._runners.get(name)
        if runner is None:
            return
        runner.session = 0.0
        runner.expires = utcnow()
        self._cancel_timer(runner)
        if runner.refs == 0 and not runner.evicting:
            self._unload(runner, "expired")

    def loaded(self) -> list[LoadedModel]:
        """Loaded models, longest remaining keep-alive first (as /api/ps sorts)."""
        now = utcnow()
        out = []
        for r in self._runners.values():
            exp = (
                r.expires if (r.refs == 0 and r.expires is not None) else expires_at(now, r.session)
            )
            out.append(
                LoadedModel(
                    spec=r.spec,
                    num_ctx=r.num_ctx,
                    size=r.memory,
                    size_vram=0 if self._config.cpu_only else r.memory,
                    expires_at=exp,
                    busy=r.busy,
                    parallel=r.parallel,
                )
            )
        out.sort(key=lambda m: int(m.expires_at.timestamp()), reverse=True)
        return out

    @property
    def memory_used(self) -> int:
        return sum(r.memory for r in self._runners.values())

    @property
    def queue_depth(self) -> int:
        return len(self._waiters)

    def unload_all(self) -> None:
        """Unload every idle model now; busy ones unload when they go idle."""
        for runner in list(self._runners.values()):
            self.expire(runner.spec.name)

    async def close(self) -> None:
        """Stop: fail waiters, cancel timers and any load in progress."""
        self._closed = True
        for waiter in self._waiters:
            if not waiter.future.done():
                waiter.future.set_exception(SchedulerClosedError("scheduler closed"))
        self._waiters.clear()
        task = self._load_task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for runner in self._runners.values():
            self._cancel_timer(runner)
            runner.idle.set()
        self._runners.clear()

    # -- internals ----------------------------------------------------------

    def _usable(self, spec: ModelSpec, num_ctx: int) -> _Runner | None:
        runner = self._runners.get(spec.name)
        if runner is None or runner.evicting or runner.num_ctx != num_ctx:
            return None
        return runner

    def _slot_free(self, runner: _Runner, name: str) -> bool:
        # FIFO per model: nobody queued ahead for this model, and a slot is free.
        if runner.busy >= runner.parallel:
            return False
        return not any(w.spec.name == name and w.slot for w in self._waiters)

    def _queue_full(self, *, needs_load: bool) -> bool:
        limit = self._config.max_queue
        if self._config.max_queue_scope == "all":
            return len(self._waiters) >= limit
        if not needs_load:
            return False
        loading = sum(1 for w in self._waiters if self._usable(w.spec, w.num_ctx) is None)
        return loading >= limit

    def _grant(self, waiter: _Waiter, runner: _Runner) -> Lease:
        runner.refs += 1
        runner.idle.clear()
        self._cancel_timer(runner)
        runner.expires = None
        if waiter.keep_alive is not None:
            runner.session = waiter.keep_alive
        runner.last_used = time.monotonic()
        if waiter.slot:
            runner.busy += 1
            self._stats.started(runner.spec.name)
        return Lease(
            model=runner.spec.name, num_ctx=runner.num_ctx, slot=waiter.slot, _runner=runner
        )

    def _remove_waiter(self, waiter: _Waiter) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
        self._stats.set_queue_depth(len(self._waiters))

    def _pump(self) -> None:
        """Grant whatever can be granted, in arrival order; start the next load."""
        if self._closed:
            return
        blocked: set[str] = set()  # models with an earlier waiter still waiting
        load_started = self._load_task is not None
        for waiter in list(self._waiters):
            if waiter.future.done():
                self._remove_waiter(waiter)
                continue
            name = waiter.spec.name
            runner = self._usable(waiter.spec, waiter.num_ctx)
            if runner is not None:
                if not waiter.slot or (name not in blocked and runner.busy < runner.parallel):
                    self._remove_waiter(waiter)
                    waiter.future.set_result(self._grant(waiter, runner))
                else:
                    blocked.add(name)
                continue
            blocked.add(name)
            if not load_started:
                # Loads are serialised: only the oldest request needing one starts it.
                load_started = True
                self._load_task = asyncio.get_running_loop().create_task(
                    self._load(waiter.spec, waiter.num_ctx, waiter.keep_alive),
                    name=f"emulator-load-{name}",
                )
        self._stats.set_queue_depth(len(self._waiters))

    def _fits(self, memory: int) -> bool:
        if len(self._runners) >= self._config.loaded_models_limit:
            return False
        budget = self._config.memory_budget
        return budget <= 0 or self.memory_used + memory <= budget

    def _pick_victim(self, keep: str) -> _Runner | None:
        candidates = [r for r in self._runners.values() if r.spec.name != keep]
        if not candidates:
            return None
        idle = [r for r in candidates if r.refs == 0]
        pool = idle or candidates
        return min(pool, key=lambda r: r.last_used)

    async def _drain_and_unload(self, runner: _Runner, reason: str) -> None:
        runner.evicting = True
        self._cancel_timer(runner)
        while runner.refs > 0:
            await runner.idle.wait()
        if self._runners.get(runner.spec.name) is runner:
            self._unload(runner, reason)

    async def _load(self, spec: ModelSpec, num_ctx: int, keep_alive: float | None) -> None:
        runner: _Runner | None = None
        try:
            existing = self._runners.get(spec.name)
            if existing is not None:
                # Loaded with other options (num_ctx): Ollama reloads the runner.
                await self._drain_and_unload(existing, "reload")
            parallel = spec.effective_parallel(self._config.num_parallel)
            memory = spec.memory_for(num_ctx, parallel)
            budget = self._config.memory_budget
            if budget > 0 and memory > budget:
                raise ModelLoadError(
                    f"model requires more system memory ({human_bytes2(memory)}) "
                    f"than is available ({human_bytes2(budget)})"
                )
            while not self._fits(memory):
                victim = self._pick_victim(keep=spec.name)
                if victim is None:
                    break
                await self._drain_and_unload(victim, "evict")
            seconds = spec.load_seconds if spec.load_seconds is not None else self._config.load_time
            if seconds > 0:
                await asyncio.sleep(seconds)
            session = keep_alive if keep_alive is not None else self._config.default_keep_alive
            runner = _Runner(
                spec=spec,
                num_ctx=num_ctx,
                parallel=parallel,
                memory=memory,
                session=session,
                last_used=time.monotonic(),
            )
            runner.idle.set()
            self._runners[spec.name] = runner
            self._stats.loads += 1
            self._stats.model(spec.name).loads += 1
        except Exception as exc:  # a failed load fails its waiters, never strands them
            for waiter in list(self._waiters):
                if waiter.spec.name == spec.name and waiter.num_ctx == num_ctx:
                    self._remove_waiter(waiter)
                    if not waiter.future.done():
                        waiter.future.set_exception(ModelLoadError(str(exc)))
        finally:
            self._load_task = None
            self._pump()
            # Nobody took it (its requester left): start the keep-alive countdown.
            if (
                runner is not None
                and not self._closed
                and runner.refs == 0
                and not runner.evicting
                and self._runners.get(spec.name) is runner
            ):
                self._on_idle(runner)

    def _on_idle(self, runner: _Runner) -> None:
        if runner.session <= 0:
            self._unload(runner, "expired")
            return
        runner.expires = expires_at(utcnow(), runner.session)
        if not math.isinf(runner.session):
            loop = asyncio.get_running_loop()
            runner.timer = loop.call_later(runner.session, self._on_timer, runner)

    def _on_timer(self, runner: _Runner) -> None:
        runner.timer = None
        if self._runners.get(runner.spec.name) is runner and runner.refs == 0:
            self._unload(runner, "expired")
            self._pump()

    def _cancel_timer(self, runner: _Runner) -> None:
        if runner.timer is not None:
            runner.timer.cancel()
            runner.timer = None

    def _unload(self, runner: _Runner, reason: str) -> None:
        name = runner.spec.name
        if self._runners.get(name) is not runner:
            return
        del self._runners[name]
        self._cancel_timer(runner)
        runner.idle.set()
        model = self._stats.model(name)
        self._stats.unloads += 1
        model.unloads += 1
        if reason == "evict":
            self._stats.evictions += 1
            model.evictions += 1
        elif reason == "reload":
            self._stats.reloads += 1
            model.reloads += 1
        else:
            self._stats.expirations += 1
            model.expirations += 1
