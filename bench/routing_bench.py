"""Routing (the Pool on its own; an extra scenario, ``routing``): how long a routing decision
takes, how many model loads affinity saves over weighted round robin on a memory-bound
fleet, and how fully the Pool keeps a saturated fleet's slots busy without ever granting
more than an instance allows."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import grpc
import httpx

from bench.load import emulator_stats
from bench.stats import goal, percentile
from services.pool import routing
from services.pool.app import PoolApp
from services.pool.routing import Candidate, Strategy
from services.pool.settings import InstanceSpec, PoolSettings
from usher.auth import parse_token_map
from usher.connections import connect_redis
from usher.emulator import EmulatorConfig, EmulatorFleet, EmulatorProcess, model_spec
from usher.logs import configure_logging
from usher.testing import RedisServer, free_port
from usher.v1 import pool_pb2, pool_pb2_grpc, request_pb2

TOKENS = "svc-token=scheduler@usher:service"
SVC = (("authorization", "Bearer svc-token"),)
GIB = 1024**3


# ---- helpers --------------------------------------------------------------------------------


def _us(samples: Sequence[float], q: float) -> float:
    return percentile(samples, q) * 1e6


def _ms(samples: Sequence[float], q: float) -> float:
    return percentile(samples, q) * 1e3


def _settings(
    redis_url: str,
    urls: Sequence[str],
    *,
    parallel: int,
    strategy: Strategy = Strategy.AFFINITY,
    memory_budget_bytes: int = 0,
    max_loaded_models: int = 0,
    health_interval_seconds: float = 3600.0,
) -> PoolSettings:
    return PoolSettings(
        instances=tuple(
            InstanceSpec(
                id=f"ollama-{i}",
                base_url=url,
                parallel=parallel,
                memory_budget_bytes=memory_budget_bytes,
                max_loaded_models=max_loaded_models,
            )
            for i, url in enumerate(urls)
        ),
        strategy=strategy,
        listen=f"127.0.0.1:{free_port()}",
        redis_url=redis_url,
        tokens=parse_token_map(TOKENS),
        log_level="warning",
        health_interval_seconds=health_interval_seconds,
        # Placement reads the scheduler's queues, which these figures do not use: every
        # load here is one a routing decision caused.
        placement_interval_seconds=3600.0,
        shutdown_grace_seconds=0.5,
    )


@contextlib.asynccontextmanager
async def _running_pool(
    settings: PoolSettings,
) -> AsyncIterator[tuple[PoolApp, pool_pb2_grpc.PoolServiceAsyncStub]]:
    client = connect_redis(settings.redis_url)
    await client.flushdb()
    await client.aclose()
    app = PoolApp(settings)
    await app.start()
    channel = grpc.aio.insecure_channel(settings.listen)
    try:
        yield app, pool_pb2_grpc.PoolServiceStub(channel)
    finally:
        await channel.close()
        await app.stop()


async def _reserve(
    stub: pool_pb2_grpc.PoolServiceAsyncStub, model: str, wait: float, holder: str = "bench"
) -> pool_pb2.Slot | None:
    request = pool_pb2.ReserveRequest(models=[model], holder=holder)
    request.wait.FromMilliseconds(int(wait * 1000))
    reply = await stub.Reserve(request, metadata=SVC, timeout=wait + 5)
    return reply.slot if reply.HasField("slot") else None


async def _generate(
    stub: pool_pb2_grpc.PoolServiceAsyncStub, slot: pool_pb2.Slot, prompt: str
) -> pool_pb2.GenerationDone | None:
    request = pool_pb2.GenerateRequest(
        slot_id=slot.id,
        request_id=slot.id.rpartition("/")[2],
        model=slot.model,
        generate=request_pb2.GenerateInput(prompt=prompt),
        stream=True,
    )
    done = None
    async for event in stub.Generate(request, metadata=SVC, timeout=120):
        if event.HasField("done"):
            done = event.done
    return done


# ---- 1. routing decision time ---------------------------------------------------------------


def _candidate_set(rng: random.Random, n: int) -> list[Candidate]:
    """A fleet as one request's model sees it: mixed sizes, some loaded, some busy, a few
    unhealthy or tripped, latencies and error rates that differ."""
    out = []
    for i in range(n):
        parallel = rng.choice((1, 2, 4, 4, 8))
        running_model = rng.randint(0, parallel)
        out.append(
            Candidate(
                instance=f"gpu-{i:02d}",
                weight=rng.choice((0.5, 1.0, 1.0, 1.0, 2.0)),
                healthy=rng.random() > 0.05,
                circuit_allows=rng.random() > 0.05,
                draining=rng.random() < 0.02,
                serves_model=rng.random() > 0.1,
                model_loaded=rng.random() < 0.4,
                needs_reload=rng.random() < 0.05,
                free_slots=parallel - running_model,
                active=running_model + rng.randint(0, 2 * parallel),
                parallel=parallel,
                latency_seconds=rng.choice((0.0, rng.uniform(0.2, 3.0))),
                error_rate=0.0 if rng.random() < 0.8 else rng.uniform(0.0, 0.4),
                can_load=rng.random() < 0.8,
            )
        )
    return out


def routing_decision(sizes: Sequence[int] = (3, 10, 20), decisions: int = 20_000) -> dict[str, Any]:
    rng = random.Random(11)
    out: dict[str, Any] = {}
    for n in sizes:
        sets = [_candidate_set(rng, n) for _ in range(500)]
        figures: dict[str, Any] = {}
        for strategy in Strategy:
            samples: list[float] = []
            clock = time.perf_counter
            for k in range(decisions):
                candidates = sets[k % len(sets)]
                started = clock()
                routing.rank(candidates, strategy, rotation=k)
                samples.append(clock() - started)
            figures[f"{strategy.value}_p50_us"] = _us(samples, 50)
            figures[f"{strategy.value}_p99_us"] = _us(samples, 99)
        out[f"{n}_instances"] = figures
    out["decisions_per_strategy"] = decisions
    out["note"] = "pure routing.rank over random realistic candidate sets, GC on"
    return out


async def try_reserve_path(
    redis: RedisServer,
    sizes: Sequence[int] = (3, 10, 20),
    iterations: int = 2000,
    rpc_iterations: int = 1000,
) -> dict[str, Any]:
    """FleetRouter.try_reserve in a started PoolApp over real Redis: one usage pipeline, the
    candidates, the ranking and the reserve script; plus the same decision through gRPC."""
    models = ["llama3.2:1b", "qwen2.5:0.5b", "gemma3:1b"]
    config = EmulatorConfig(models=[model_spec(m) for m in models])
    config.make_instant()
    parallel = 4
    out: dict[str, Any] = {}
    for n in sizes:
        rng = random.Random(n)
        async with EmulatorFleet(n, config=config) as fleet:
            settings = _settings(
                redis.url, fleet.urls, parallel=parallel, memory_budget_bytes=8 * GIB
            )
            async with _running_pool(settings) as (app, stub):
                ids = list(app.registry.instances)
                # Some instances have the model loaded (as after earlier requests), and some
                # of their slots are taken, so the decision has real differences to weigh.
                for state in app.registry.instances.values():
                    for model in models:
                        if rng.random() < 0.4:
                            app.registry.record(state, model, True, rng.uniform(0.2, 2.0))
                for instance in ids:
                    for _ in range(rng.randint(0, parallel - 1)):
                        await app.slots.try_reserve(
                            instance, models[0], parallel, 0, "other", request_pb2.ROUTE_LOCAL
                        )
                total: list[float] = []
                release: list[float] = []
                usage_t: list[float] = []
                candidates_t: list[float] = []
                rank_t: list[float] = []
                script_t: list[float] = []
                clock = time.perf_counter
                for k in range(iterations):
                    model = models[0]
                    started = clock()
                    grant = await app.router.try_reserve(model, "bench", False)
                    reserved = clock()
                    if grant is None:
                        raise RuntimeError("no slot although the fleet has free ones")
                    await app.router.release(grant)
                    total.append(reserved - started)
                    release.append(clock() - reserved)
                    # The same steps one by one (mirrors FleetRouter.try_reserve).
                    t0 = clock()
                    usage = await app.slots.usage(ids, model)
                    t1 = clock()
                    candidates = app.registry.candidates(model, usage, False, ())
                    t2 = clock()
                    ranked = routing.rank(candidates, app.router.strategy, rotation=k)
                    t3 = clock()
                    first = ranked[0]
                    grant = await app.slots.try_reserve(
                        first.instance, model, parallel, 0, "bench", request_pb2.ROUTE_LOCAL
                    )
                    t4 = clock()
                    if grant is not None:
                        await app.slots.release(grant)
                    usage_t.append(t1 - t0)
                    candidates_t.append(t2 - t1)
                    rank_t.append(t3 - t2)
                    script_t.append(t4 - t3)
                rpc: list[float] = []
                for _ in range(rpc_iterations):
                    started = clock()
                    slot = await _reserve(stub, models[0], wait=0.0)
                    rpc.append(clock() - started)
                    if slot is None:
                        raise RuntimeError("Reserve granted nothing")
                    await stub.Release(pool_pb2.ReleaseRequest(slot_id=slot.id), metadata=SVC)
        out[f"{n}_instances"] = {
            "try_reserve_p50_us": _us(total, 50),
            "try_reserve_p99_us": _us(total, 99),
            "release_p50_us": _us(release, 50),
            "usage_pipeline_p50_us": _us(usage_t, 50),
            "candidates_p50_us": _us(candidates_t, 50),
            "candidates_p99_us": _us(candidates_t, 99),
            "rank_p50_us": _us(rank_t, 50),
            "rank_p99_us": _us(rank_t, 99),
            "reserve_script_p50_us": _us(script_t, 50),
            "grpc_reserve_p50_us": _us(rpc, 50),
            "grpc_reserve_p99_us": _us(rpc, 99),
        }
    out["iterations"] = iterations
    out["note"] = (
        "in-process PoolApp + real Redis; the decision itself is candidates + rank, the rest "
        "are two Redis round trips"
    )
    return out


# ---- 2. model loads: affinity vs weighted round robin ---------------------------------------

#: Five models of 1 GiB each; every instance has room for two.
LOAD_MODELS = ("llama3.2:1b", "qwen2.5:0.5b", "gemma3:1b", "phi3:mini", "qwen2.5:1.5b")
LOAD_BUDGET = int(2.5 * GIB)


@dataclass(frozen=True, slots=True)
class Arrival:
    at: float
    model: str
    prompt: str


def mixed_workload(
    seed: int = 5,
    requests: int = 400,
    rate: float = 25.0,
    burst_every: float = 2.0,
    burst_size: int = 12,
) -> list[Arrival]:
    """Poisson arrivals over the models with Zipf-like popularity (s=1.2), plus a burst of
    ``burst_size`` requests for one model (any model, popular or not) every ``burst_every``
    seconds."""
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** 1.2 for k in range(len(LOAD_MODELS))]
    out: list[Arrival] = []
    t, next_burst, n = 0.0, burst_every, 0
    while len(out) < requests:
        t += rng.expovariate(rate)
        while next_burst <= t:
            model = rng.choice(LOAD_MODELS)
            out.extend(
                Arrival(next_burst + j * 0.005, model, f"burst {n} {j} " * 8)
                for j in range(burst_size)
            )
            next_burst += burst_every
            n += 1
        out.append(Arrival(t, rng.choices(LOAD_MODELS, weights)[0], f"question {len(out)} " * 8))
    out.sort(key=lambda a: a.at)
    return out[:requests]


async def _run_workload(
    redis: RedisServer, strategy: Strategy, workload: Sequence[Arrival], instances: int
) -> dict[str, Any]:
    config = EmulatorConfig(
        models=[model_spec(f"{m}@1GiB") for m in LOAD_MODELS],
        num_parallel=2,
        load_time=0.3,
        time_to_first_token=0.01,
        tokens_per_second=300.0,
        output_tokens=(10, 30),
        memory_budget=LOAD_BUDGET,
    )
    latencies: list[float] = []
    failures = 0
    async with EmulatorFleet(instances, config=config) as fleet:
        settings = _settings(
            redis.url,
            fleet.urls,
            parallel=2,
            strategy=strategy,
            memory_budget_bytes=LOAD_BUDGET,
            health_interval_seconds=2.0,
        )
        async with _running_pool(settings) as (_, stub):
            began = time.perf_counter()
            finished_at = began

            async def one(arrival: Arrival) -> None:
                nonlocal failures, finished_at
                await asyncio.sleep(max(0.0, began + arrival.at - time.perf_counter()))
                started = time.perf_counter()
                try:
                    slot = await _reserve(stub, arrival.model, wait=60.0)
                    if slot is None:
                        raise RuntimeError("no slot within 60 s")
                    done = await _generate(stub, slot, arrival.prompt)
                    if done is None:
                        raise RuntimeError("no result")
                except (grpc.aio.AioRpcError, RuntimeError):
                    failures += 1
                    return
                now = time.perf_counter()
                latencies.append(now - started)
                finished_at = max(finished_at, now)

            await asyncio.gather(*(one(a) for a in workload))
            elapsed = finished_at - began
        loads = sum(s.stats.loads for s in fleet)
        evictions = sum(s.stats.evictions for s in fleet)
        per_instance = [s.stats.loads for s in fleet]
        per_model = [sum(s.stats.model(m).loads for s in fleet) for m in LOAD_MODELS]
    return {
        "loads": loads,
        "evictions": evictions,
        "loads_plus_evictions": loads + evictions,
        "loads_per_instance": per_instance,
        "loads_per_model": per_model,
        "completed": len(latencies),
        "failed": failures,
        "throughput_rps": len(latencies) / elapsed,
        "p50_ms": _ms(latencies, 50),
        "p99_ms": _ms(latencies, 99),
    }


async def loads_affinity_vs_wrr(redis: RedisServer, instances: int = 4) -> dict[str, Any]:
    workload = mixed_workload()
    shares = {m: sum(a.model == m for a in workload) for m in LOAD_MODELS}
    out: dict[str, Any] = {
        strategy.value: await _run_workload(redis, strategy, workload, instances)
        for strategy in (Strategy.AFFINITY, Strategy.WEIGHTED_ROUND_ROBIN)
    }
    out.update(
        instances=instances,
        slots_per_instance=2,
        models=len(LOAD_MODELS),
        models_fitting_per_instance=2,
        requests=len(workload),
        requests_per_model=list(shares.values()),
        emulated_load_s=0.3,
        note="same seeded sequence (Zipf s=1.2, Poisson 25/s + a 12-request burst for one "
        "model every 2 s); latency = Reserve + Generate from arrival",
    )
    return out


# ---- 3. slot utilization under saturation ---------------------------------------------------


async def slot_utilization(
    redis: RedisServer,
    instances: int = 3,
    parallel: int = 4,
    workers: int = 64,
    warmup_s: float = 2.0,
    seconds: float = 10.0,
    tokens_per_second: float = 80.0,
) -> dict[str, Any]:
    models = ("llama3.2:1b", "qwen2.5:0.5b")
    per_instance_limit = parallel * len(models)
    total_slots = instances * per_instance_limit
    config = EmulatorConfig(
        models=[model_spec(m) for m in models],
        num_parallel=parallel,
        load_time=0.2,
        time_to_first_token=0.02,
        tokens_per_second=tokens_per_second,
        output_tokens=(10, 30),
        max_loaded_models=len(models),
    )
    # The emulators run in their own process, so their work does not slow the Pool down.
    emulators = EmulatorProcess(["--fleet", str(instances)], config=config)
    urls = emulators.start()
    try:
        settings = _settings(
            redis.url,
            urls,
            parallel=parallel,
            max_loaded_models=len(models),
            health_interval_seconds=2.0,
        )
        async with (
            _running_pool(settings) as (app, stub),
            httpx.AsyncClient(timeout=5) as http,
        ):
            ids = list(app.registry.instances)
            stop = asyncio.Event()
            measuring = asyncio.Event()
            latencies: list[float] = []
            reserve_waits: list[float] = []
            completed = 0

            async def worker(w: int) -> None:
                nonlocal completed
                # Each worker sticks to one model, so both models always have more waiters
                # than slots (a random pick per request lets one model's waiters run out).
                model = models[w % len(models)]
                n = 0
                while not stop.is_set():
                    n += 1
                    started = time.perf_counter()
                    slot = await _reserve(stub, model, wait=5.0)
                    if slot is None:
                        continue
                    granted = time.perf_counter()
                    done = await _generate(stub, slot, f"worker {w} request {n}")
                    if done is not None and measuring.is_set() and not stop.is_set():
                        completed += 1
                        latencies.append(time.perf_counter() - started)
                        reserve_waits.append(granted - started)

            busy_redis: list[int] = []
            busy_upstream: list[int] = []
            max_model_slots = 0
            max_instance_slots = 0
            max_upstream_outstanding = 0

            async def sampler() -> None:
                nonlocal max_model_slots, max_instance_slots, max_upstream_outstanding
                while not stop.is_set():
                    tick = time.perf_counter()
                    usage = [await app.slots.usage(ids, m) for m in models]
                    per_instance = [usage[0][i].total_active for i in ids]
                    max_model_slots = max(
                        max_model_slots, *(u[i].model_active for u in usage for i in ids)
                    )
                    max_instance_slots = max(max_instance_slots, *per_instance)
                    stats = await emulator_stats(http, urls)
                    max_upstream_outstanding = max(
                        max_upstream_outstanding,
                        *(int(s["in_flight"]) + int(s["queue_depth"]) for s in stats),
                    )
                    if measuring.is_set():
                        busy_redis.append(sum(per_instance))
                        busy_upstream.append(sum(int(s["in_flight"]) for s in stats))
                    await asyncio.sleep(max(0.0, 0.05 - (time.perf_counter() - tick)))

            tasks = [asyncio.create_task(worker(w)) for w in range(workers)]
            sampling = asyncio.create_task(sampler())
            await asyncio.sleep(warmup_s)  # models load on first use
            for url in urls:
                await http.delete(f"{url}/_emulator/stats")
            measuring.set()
            began = time.perf_counter()
            cpu_before = time.process_time()
            await asyncio.sleep(seconds)
            cpu_after = time.process_time()
            elapsed = time.perf_counter() - began
            stop.set()
            await asyncio.gather(*tasks, sampling)
            final = await emulator_stats(http, urls)
    finally:
        emulators.terminate()
    model_in_flight_max = max(
        int(m["in_flight_max"]) for s in final for m in cast(dict[str, Any], s["models"]).values()
    )
    return {
        "instances": instances,
        "models": len(models),
        "per_model_limit": parallel,
        "per_instance_limit": per_instance_limit,
        "total_slots": total_slots,
        "workers": workers,
        "seconds": seconds,
        "mean_generation_ms": 20 / tokens_per_second * 1000 + 20,
        "samples": len(busy_redis),
        "utilization_redis": sum(busy_redis) / len(busy_redis) / total_slots,
        "utilization_upstream": sum(busy_upstream) / len(busy_upstream) / total_slots,
        "max_slots_per_instance_model": max_model_slots,
        "max_slots_per_instance": max_instance_slots,
        "max_upstream_outstanding_per_instance": max_upstream_outstanding,
        "upstream_in_flight_max_per_model": model_in_flight_max,
        "upstream_in_flight_max_per_instance": max(int(s["in_flight_max"]) for s in final),
        "upstream_queue_depth_max": max(int(s["queue_depth_max"]) for s in final),
        "limits_respected": max_model_slots <= parallel
        and max_instance_slots <= per_instance_limit
        and max_upstream_outstanding <= per_instance_limit
        and model_in_flight_max <= parallel,
        "requests_per_second": completed / elapsed,
        "p50_ms": _ms(latencies, 50),
        "p99_ms": _ms(latencies, 99),
        "reserve_wait_p50_ms": _ms(reserve_waits, 50),
        "reserve_wait_p99_ms": _ms(reserve_waits, 99),
        "pool_and_client_process_cpu_percent": 100 * (cpu_after - cpu_before) / elapsed,
        "note": "slot usage sampled every 50 ms from Redis (granted) and from the emulators "
        "(running); upstream outstanding = running + waiting in the emulator's own queue",
    }


async def run() -> dict[str, Any]:
    configure_logging("warning")
    gc.collect()
    rank = routing_decision()
    with RedisServer(appendfsync="everysec") as redis:
        try_reserve = await try_reserve_path(redis)
        loads = await loads_affinity_vs_wrr(redis)
        slots = {
            # Slow generations (about 1 s): what the slot protocol itself leaves idle.
            "slow": await slot_utilization(redis, tokens_per_second=20.0),
            # Fast ones (about 0.27 s): the same with this process near one full core.
            "fast": await slot_utilization(redis, tokens_per_second=80.0),
        }
    return {
        "rank": rank,
        "try_reserve": try_reserve,
        "loads": loads,
        "slots": slots,
        "goals": {
            "rank_p99_us_20_instances": goal(
                max(v for k, v in rank["20_instances"].items() if k.endswith("_p99_us")),
                1000,
                at_most=True,
            ),
        },
    }
