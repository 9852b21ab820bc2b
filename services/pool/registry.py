"""What one Pool replica knows about each instance: health, circuits, models, recent speed.

Configured instances come from settings; instances registered at runtime, drains and weight
changes live in Redis so every replica sees them. Health, circuits and latency are each
replica's own observations (as a load balancer's outlier detection is), refreshed by the
health loop every few seconds and by every request's outcome.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import cast

import redis.asyncio as aioredis

from services.pool.circuit import CircuitBreaker
from services.pool.placement import InstanceView, LoadedInfo
from services.pool.routing import Candidate
from services.pool.settings import InstanceSpec, PoolSettings, upstream_api_key
from services.pool.slots import SlotUsage
from services.pool.upstream import LoadedModelInfo, Upstream, UpstreamError
from services.pool.upstream_kinds import make_upstream
from usher import keys, metrics
from usher.config import ConfigError
from usher.keys import ModelKeys
from usher.logs import get_logger
from usher.smoothing import ewma
from usher.v1 import pool_pb2

_REPLACE_HASH = (resources.files("services.pool") / "lua" / "replace_hash.lua").read_text()

__all__ = ["InstanceState", "Registry", "connection_limit", "health_after_check"]

log = get_logger(__name__)

_CIRCUIT_LEVEL = {"closed": 0, "half_open": 1, "open": 2}
#: Counted per request: the labelled children are looked up once each.
_POOL_REQUESTS = metrics.Children(metrics.POOL_REQUESTS)
_TIME_TO_FIRST_TOKEN = metrics.Children(metrics.TIME_TO_FIRST_TOKEN)
#: How long a model stays in the catalogue after the last instance offering it went away
#: (an instance that is down for a while, or a Pool restart, doesn't unlist its models).
CATALOGUE_RETENTION_SECONDS = 24 * 3600
#: Weight of the newest sample in an instance's latency and error-rate averages.
ALPHA = 0.2


@dataclass
class InstanceState:
    spec: InstanceSpec
    upstream: Upstream
    circuit: CircuitBreaker
    model_circuits: dict[str, CircuitBreaker] = field(default_factory=dict)
    healthy: bool = False
    #: Health checks failed in a row (an instance leaves rotation at the threshold).
    failed_checks: int = 0
    last_error: str = ""
    last_checked: float = 0.0
    available: dict[str, int] = field(default_factory=dict)  # model → size in bytes
    loaded: dict[str, LoadedModelInfo] = field(default_factory=dict)
    last_used: dict[str, float] = field(default_factory=dict)
    latency: float | None = None
    error_rate: float = 0.0
    weight: float = 1.0
    draining: bool = False
    #: model → until when (epoch seconds; -1: for ever) it stays loaded, from LoadModel's
    #: keep_alive (keys.POOL_HELD).
    held: dict[str, float] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.spec.id

    def held_for(self, model: str, now: float) -> float:
        """How much longer ``model`` is held loaded here (-1: for ever; 0: not held)."""
        until = self.held.get(model, 0.0)
        return -1.0 if until < 0 else max(0.0, until - now)

    def model_circuit(self, model: str, make: Callable[[], CircuitBreaker]) -> CircuitBreaker:
        if model not in self.model_circuits:
            self.model_circuits[model] = make()
        return self.model_circuits[model]

    def serves(self, model: str) -> bool:
        if self.spec.allowed_models and model not in self.spec.allowed_models:
            return False
        # OpenAI-compatible servers load on their own; trust their /v1/models list when known.
        return model in self.available or (self.spec.kind == "openai" and not self.available)

    def is_loaded(self, model: str) -> bool:
        return self.spec.kind == "openai" or model in self.loaded

    def view(self, active: Mapping[str, int] | None = None) -> InstanceView:
        """What placement needs to know; ``active`` counts running requests per model, so
        a busy model is never chosen for eviction."""
        now = time.time()
        running = active or {}
        return InstanceView(
            id=self.id,
            healthy=self.healthy,
            draining=self.draining,
            memory_budget_bytes=self.spec.memory_budget_bytes,
            max_loaded_models=self.spec.max_loaded_models,
            loaded=tuple(
                LoadedInfo(
                    model=name,
                    size_bytes=info.size_bytes,
                    last_used=self.last_used.get(name, now),
                    active=running.get(name, 0),
                    num_ctx=info.context_length,
                )
                for name, info in self.loaded.items()
            ),
            available_models=frozenset(self.available),
            allowed_models=self.spec.allowed_models,
            # A model held (LoadModel's keep_alive) is kept loaded as a preload is, until then.
            preload=frozenset(self.spec.preload) | {m for m in self.held if self.held_for(m, now)},
            external=self.spec.external,
        )


class Registry:
    def __init__(
        self,
        settings: PoolSettings,
        client: aioredis.Redis,
        upstream_factory: Callable[[InstanceSpec], Upstream] | None = None,
    ) -> None:
        self.settings = settings
        self.redis = client
        self._make_upstream = upstream_factory or _default_upstream
        self.instances: dict[str, InstanceState] = {}
        self._configured = {spec.id for spec in settings.instances}
        #: model → requests of it one instance runs at once, where an operator set it
        #: (UpdateQueueConfig.parallel, the gateway's parallel_limit); read every health pass.
        self.model_parallel: dict[str, int] = {}
        for spec in settings.instances:
            self._add(spec)

    def new_circuit(self) -> CircuitBreaker:
        return CircuitBreaker.from_config(self.settings.circuit)

    def _add(self, spec: InstanceSpec) -> InstanceState:
        state = InstanceState(
            spec, self._make_upstream(spec), self.new_circuit(), weight=spec.weight
        )
        self.instances[spec.id] = state
        return state

    async def _drop(self, instance_id: str) -> None:
        state = self.instances.pop(instance_id, None)
        if state is not None:
            await state.upstream.aclose()

    async def register(self, spec: InstanceSpec) -> InstanceState:
        """Add or replace a runtime instance, for every replica (via Redis) and here now."""
        await self.redis.hset(keys.POOL_INSTANCES, spec.id, spec.to_proto().SerializeToString())
        await self._drop(spec.id)
        state = self._add(spec)
        await self.check(state)
        return state

    async def deregister(self, instance_id: str) -> bool:
        removed = int(await self.redis.hdel(keys.POOL_INSTANCES, instance_id))
        known = instance_id in self.instances
        if instance_id not in self._configured:
            await self._drop(instance_id)
        return bool(removed) or known

    async def set_draining(self, instance_id: str, draining: bool) -> None:
        if draining:
            await self.redis.sadd(keys.POOL_DRAINING, instance_id)
        else:
            await self.redis.srem(keys.POOL_DRAINING, instance_id)
        self.instances[instance_id].draining = draining

    async def hold(self, instance_id: str, model: str, keep_alive_seconds: float) -> None:
        """Keep ``model`` loaded on the instance this long (< 0: until unloaded by hand), for
        every replica; 0 lets it go."""
        field_name = f"{instance_id}/{model}"
        held = self.instances[instance_id].held
        if keep_alive_seconds == 0:
            await self.redis.hdel(keys.POOL_HELD, field_name)
            held.pop(model, None)
            return
        until = -1.0 if keep_alive_seconds < 0 else time.time() + keep_alive_seconds
        await self.redis.hset(keys.POOL_HELD, field_name, round(until * 1000) if until > 0 else -1)
        held[model] = until

    async def set_weight(self, instance_id: str, weight: float) -> None:
        await self.redis.hset(keys.POOL_WEIGHTS, instance_id, repr(weight))
        self.instances[instance_id].weight = weight

    async def sync_shared(self) -> None:
        """Pick up runtime registrations, drains and weights made through any replica."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.POOL_INSTANCES)
            pipe.smembers(keys.POOL_DRAINING)
            pipe.hgetall(keys.POOL_WEIGHTS)
            pipe.hgetall(keys.POOL_HELD)
            registered, draining, weights, held = cast(
                tuple[dict[bytes, bytes], set[bytes], dict[bytes, bytes], dict[bytes, bytes]],
                tuple(await pipe.execute()),
            )
        runtime: dict[str, InstanceSpec | None] = {
            k.decode(): _stored_spec(k.decode(), v) for k, v in registered.items()
        }
        for instance_id, spec in runtime.items():
            current = self.instances.get(instance_id)
            if spec is not None and (current is None or current.spec != spec):
                await self._drop(instance_id)
                self._add(spec)
        for instance_id in list(self.instances):
            if instance_id not in runtime and instance_id not in self._configured:
                await self._drop(instance_id)
        drained = {d.decode() for d in draining}
        overrides = {k.decode(): float(v) for k, v in weights.items()}
        holds = _holds(held)
        for state in self.instances.values():
            state.draining = state.id in drained
            state.weight = overrides.get(state.id, state.spec.weight)
            state.held = holds.get(state.id, {})

    async def check(self, state: InstanceState) -> None:
        """One health check: liveness, models offered, models loaded."""
        upstream = state.upstream
        timeout = self.settings.health_timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                await upstream.health()
                models = await upstream.list_models()
                loaded = await upstream.loaded_models()
        except (UpstreamError, TimeoutError) as exc:
            healthy, state.failed_checks = health_after_check(
                state.healthy, state.failed_checks, False, self.settings.unhealthy_after_failures
            )
            if state.healthy and not healthy:
                log.warning(
                    "instance unhealthy",
                    instance=state.id,
                    error=str(exc),
                    failed_checks=state.failed_checks,
                )
            state.healthy = healthy
            state.last_error = str(exc) or type(exc).__name__
        else:
            if not state.healthy:
                log.info("instance healthy", instance=state.id, models=len(models))
            state.healthy, state.failed_checks = health_after_check(
                state.healthy, state.failed_checks, True, self.settings.unhealthy_after_failures
            )
            state.last_error = ""
            state.available = {m.name: m.size_bytes for m in models}
            state.loaded = {m.name: m for m in loaded}
        state.last_checked = time.time()
        metrics.INSTANCE_UP.labels(state.id).set(1 if state.healthy else 0)
        metrics.MODELS_LOADED.labels(state.id).set(len(state.loaded))
        metrics.SLOTS_TOTAL.labels(state.id).set(state.spec.parallel)
        metrics.CIRCUIT_STATE.labels(state.id).set(
            _CIRCUIT_LEVEL[state.circuit.state(time.monotonic()).value]
        )

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(s) for s in list(self.instances.values())))
        await self.publish_capacity()

    def slots_for(self, state: InstanceState, model: str) -> int:
        """Requests of ``model`` that ``state`` runs at once: the model's parallel limit
        when an operator set one, else the instance's ``parallel`` (auto: by memory)."""
        return self.model_parallel.get(model) or state.spec.parallel

    async def sync_model_parallel(self) -> None:
        """Pick up per-model parallel limits set at runtime (any replica, any gateway)."""
        models = sorted(self.catalogue())
        if not models:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for model in models:
                pipe.hget(ModelKeys(model).config, "parallel")
            values = await pipe.execute()
        self.model_parallel = {
            model: int(value) for model, value in zip(models, values, strict=True) if value
        }

    def serving(self) -> int:
        """Instances that can take requests now: healthy and not draining."""
        return sum(1 for s in self.instances.values() if s.healthy and not s.draining)

    def capacity(self) -> dict[str, int]:
        """Slots per model that healthy, undrained local instances offer now."""
        slots: dict[str, int] = {}
        for state in self.instances.values():
            if not state.healthy or state.draining or state.spec.external:
                continue
            for model in state.available:
                if state.serves(model):
                    slots[model] = slots.get(model, 0) + self.slots_for(state, model)
        return slots

    def catalogue(self) -> set[str]:
        """Every model some instance offers: listed by it (even while it is unhealthy, from
        its last answer), loaded, allowed or preloaded by its config."""
        models: set[str] = set()
        for state in self.instances.values():
            models.update(m for m in state.available if state.serves(m))
            models.update(state.loaded)
            models.update(state.spec.allowed_models)
            models.update(state.spec.preload)
        return models

    async def publish_capacity(self) -> None:
        slots = self.capacity()
        now_ms = int(time.time() * 1000)
        offered = self.catalogue()
        flat: list[str | int] = [part for item in sorted(slots.items()) for part in item]
        # Not a MULTI: its keys lie in different Cluster slots. Each key is written whole
        # (the capacity hash replaced by one script), which is all readers rely on.
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.eval(_REPLACE_HASH, 1, keys.POOL_CAPACITY, *flat)
            if offered:
                pipe.hset(keys.POOL_CATALOGUE, mapping=dict.fromkeys(offered, now_ms))
            if any(
                s.spec.external and s.healthy and not s.draining for s in self.instances.values()
            ):
                # Expires unless a later pass renews it: a Pool that died says nothing.
                ttl_ms = int(max(10.0, 3 * self.settings.health_interval_seconds) * 1000)
                pipe.set(keys.POOL_EXTERNAL, 1, px=ttl_ms)
            else:
                pipe.delete(keys.POOL_EXTERNAL)
            pipe.hgetall(keys.POOL_CATALOGUE)
            *_, seen = await pipe.execute()
        # A model no replica has offered for a while has left the fleet.
        cutoff = now_ms - CATALOGUE_RETENTION_SECONDS * 1000
        gone = [model for model, at in seen.items() if int(at) < cutoff]
        if gone:
            await self.redis.hdel(keys.POOL_CATALOGUE, *gone)

    def record(self, state: InstanceState, model: str, ok: bool, latency: float | None) -> None:
        """Feed one request's outcome into circuits and the instance's recent averages."""
        now = time.monotonic()
        circuit = state.model_circuit(model, self.new_circuit)
        if ok:
            state.circuit.record_success(now)
            circuit.record_success(now)
            state.last_used[model] = time.time()
            if model not in state.loaded and state.spec.kind == "ollama":
                # It just answered, so it is loaded now: route to it without waiting for
                # the next /api/ps poll (which fills in the real size and expiry).
                size = state.available.get(model, 0)
                state.loaded[model] = LoadedModelInfo(model, size, size, None)
        else:
            state.circuit.record_failure(now)
            circuit.record_failure(now)
        state.error_rate = ewma(state.error_rate, 0.0 if ok else 1.0, ALPHA)
        _POOL_REQUESTS(state.id, model, "ok" if ok else "error").inc()
        if ok and latency is not None:
            _TIME_TO_FIRST_TOKEN(state.id, model).observe(latency)
        if latency is not None:
            state.latency = ewma(state.latency, latency, ALPHA)

    def mark_unreachable(self, state: InstanceState, error: str) -> None:
        """A connection failure takes an instance out of rotation at once, not at next check."""
        state.healthy = False
        state.last_error = error

    def candidates(
        self,
        model: str,
        usage: dict[str, SlotUsage],
        external: bool,
        exclude: Iterable[str] = (),
        *,
        role: str | None = None,
    ) -> list[Candidate]:
        """Every instance of the lane as a routing candidate for ``model``; with ``role``
        ("chat" or "embedding") an instance whose ``roles`` exclude it does not serve it."""
        now = time.monotonic()
        skipped = set(exclude)
        out = []
        for state in self.instances.values():
            if state.spec.external != external or state.id in skipped:
                continue
            used = usage.get(state.id, SlotUsage(0, 0))
            circuit = state.model_circuits.get(model)
            size = state.available.get(model, 0)
            out.append(
                Candidate(
                    instance=state.id,
                    weight=state.weight,
                    healthy=state.healthy,
                    circuit_allows=state.circuit.would_allow(now)
                    and (circuit is None or circuit.would_allow(now)),
                    draining=state.draining,
                    serves_model=state.serves(model)
                    and (role is None or state.spec.serves_role(role)),
                    model_loaded=state.is_loaded(model),
                    needs_reload=False,
                    free_slots=max(0, self.slots_for(state, model) - used.model_active),
                    active=used.total_active,
                    parallel=self.slots_for(state, model),
                    latency_seconds=state.latency or 0.0,
                    error_rate=state.error_rate,
                    can_load=state.is_loaded(model) or _fits(state, size),
                    external=state.spec.external,
                )
            )
        return out

    async def aclose(self) -> None:
        for state in self.instances.values():
            await state.upstream.aclose()


def health_after_check(
    healthy: bool, failed_in_row: int, ok: bool, threshold: int
) -> tuple[bool, int]:
    """(healthy, failed checks in a row) after one health check. An instance leaves
    rotation after ``threshold`` failed checks in a row (one slow answer is not an outage)
    and is back after one good check. One never seen healthy stays out until it answers."""
    if ok:
        return True, 0
    failed_in_row += 1
    return healthy and failed_in_row < threshold, failed_in_row


def _fits(state: InstanceState, size: int) -> bool:
    from services.pool.placement import evictions_to_fit

    return evictions_to_fit(state.view(), size, time.time()) is not None


#: The fewest connections the Pool may hold open to one model server.
MIN_CONNECTIONS = 256
#: Connections beyond a server's slots: its health checks, listings and model loads.
CONTROL_CONNECTIONS = 16


def connection_limit(spec: InstanceSpec) -> int:
    """The most connections the Pool holds open to one model server: one for every call its
    slots let run at once (``concurrent_calls``) and a few for control calls, at least
    MIN_CONNECTIONS. A call past the cap waits for a free connection and, after the connect
    timeout, fails over: from a server whose slots were free (with the cap at 256 whatever
    the slots, 320 streams on one server of ``parallel=500`` waited up to 17 s for their
    first token)."""
    return max(MIN_CONNECTIONS, spec.concurrent_calls + CONTROL_CONNECTIONS)


def _default_upstream(spec: InstanceSpec) -> Upstream:
    return make_upstream(
        spec.kind,
        spec.base_url,
        api_key=upstream_api_key(spec.api_key_env),
        max_connections=connection_limit(spec),
    )


def _stored_spec(instance_id: str, stored: bytes) -> InstanceSpec | None:
    """A registration as stored, or None when the rules have tightened since it was accepted
    (logged; the instance is left as it is here, and the others are picked up)."""
    try:
        return InstanceSpec.from_proto(pool_pb2.InstanceConfig.FromString(stored))
    except ConfigError as error:
        log.error("stored registration refused", instance=instance_id, error=str(error))
        return None


def _holds(stored: Mapping[bytes, bytes]) -> dict[str, dict[str, float]]:
    """keys.POOL_HELD as instance → model → until (epoch seconds; -1: for ever)."""
    holds: dict[str, dict[str, float]] = {}
    for name, until_ms in stored.items():
        instance_id, _, model = name.decode().partition("/")
        until = float(until_ms)
        holds.setdefault(instance_id, {})[model] = until if until < 0 else until / 1000
    return holds
