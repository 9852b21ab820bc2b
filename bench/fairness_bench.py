"""Fairness on the real queue (Redis + the Scheduler's Lua scripts), with the bench playing
the dispatcher: slots claim in fair order and "serve" each request by sleeping, so the
figures isolate the ordering, not the model server.

1. **light tenant**: a light, interactive tenant's wait and latency while a heavy tenant's
   backlog keeps every slot busy, with fair queuing and with FIFO, against the light tenant
   alone. A scheduler that does not preempt must let one of the running requests finish
   first: the light tenant's floor is its solo latency plus the expected wait for the first
   of the busy slots to free, computed for the same service-time distribution.
2. **Jain's index** of served tokens among three backlogged tenants under FIFO, fair
   queuing, and fair queuing with priority classes (heavy BATCH, light HIGH).
3. **the full path** (``bench/fairness_path.py``): the light tenant alone and under a
   heavy flood through the HTTP gateway, the trio or ``usher serve``, and an emulated
   model server (2 slots, ~50 ms per request). Goal (issue 17): at most 1.3 times alone."""

from __future__ import annotations

import asyncio
import bisect
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench import plots
from bench.fairness_path import full_path
from bench.stats import goal, latency_ms, percentile
from services.scheduler.store import FinishedWork, Lease, NewRequest, QueueStore
from usher.connections import connect_redis
from usher.ids import new_request_id
from usher.queue.records import QueueDefaults
from usher.testing import RedisServer
from usher.v1 import request_pb2, scheduler_pb2

MODEL = "llama3.2"
SLOTS = 4
GOAL_LIGHT_RATIO = 1.2
GOAL_FULL_PATH_RATIO = 1.3

# ---- the dispatcher the bench plays ---------------------------------------------------------

_PAYLOAD = scheduler_pb2.SubmitRequest(
    model=MODEL, generate=request_pb2.GenerateInput(prompt="x")
).SerializeToString()


def _request(user: str, prompt_tokens: int, priority: int = 0) -> NewRequest:
    return NewRequest(
        id=new_request_id(),
        model=MODEL,
        kind=request_pb2.REQUEST_KIND_GENERATE,
        user=user,
        organization="acme",
        priority=priority,
        fallback=1,
        payload=_PAYLOAD,
        prompt_tokens=prompt_tokens,
    )


@dataclass
class Dispatch:
    """When each request was submitted, claimed and finished (perf_counter seconds). Every
    request is reported done with ``output_tokens`` generated in ``service_ms``."""

    output_tokens: int = 0
    service_ms: float = 1.0
    submitted: dict[str, float] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)
    finished: dict[str, float] = field(default_factory=dict)

    async def submit(self, store: QueueStore, request: NewRequest) -> None:
        self.submitted[request.id] = time.perf_counter()
        await store.submit(request)

    async def slot(
        self, store: QueueStore, serve_seconds: Callable[[Lease], float], stop: asyncio.Event
    ) -> None:
        """One dispatch slot: claim in fair order, serve, finish; until ``stop``."""
        while not stop.is_set():
            lease = await store.claim(MODEL, "bench")
            if lease is None:
                await asyncio.sleep(0.002)
                continue
            self.started[lease.request.id] = time.perf_counter()
            await asyncio.sleep(serve_seconds(lease))
            await store.finish(
                lease,
                FinishedWork(
                    state=request_pb2.REQUEST_STATE_COMPLETED,
                    actual_tokens=lease.request.prompt_tokens + self.output_tokens,
                    service_ms=self.service_ms,
                    output_tokens=self.output_tokens,
                ),
            )
            self.finished[lease.request.id] = time.perf_counter()


async def _store(redis_url: str, **defaults: int) -> QueueStore:
    client = connect_redis(redis_url)
    await client.flushdb()
    return QueueStore(client, QueueDefaults(max_queue_size=10**6, **defaults))


# ---- 1. the light tenant --------------------------------------------------------------------

#: Mean service time of the light-tenant case; each one is drawn by service_time(). The heavy
#: backlog outlasts the light tenant's requests (1,000 x 50 ms / 4 slots > 80 x 0.12 s).
MEAN_SERVICE_S = 0.05
HEAVY_BACKLOG = 1000
LIGHT_REQUESTS = 80
LIGHT_GAP_S = 0.12
SEED = 7


def service_time(rng: random.Random, mean: float = MEAN_SERVICE_S) -> float:
    """Service times vary (0.5x to 1.5x the mean, uniformly) as real generations do;
    identical ones would keep the slots finishing in lockstep."""
    return mean * rng.uniform(0.5, 1.5)


def first_free_waits(
    slots: int,
    draw: Callable[[random.Random], float],
    seed: int = SEED,
    arrivals: int = 20_000,
    services_per_slot: int = 4_000,
) -> list[float]:
    """How long a request arriving at a random moment waits for the first of ``slots`` busy
    slots to free, each slot serving back to back with service times from ``draw``. A
    non-preemptive scheduler can do no better for a newcomer when every slot is busy.
    (For exponential service of mean S the mean is S/slots.)"""
    rng = random.Random(seed)
    ends: list[list[float]] = []
    for _ in range(slots):
        t, slot_ends = rng.uniform(0, draw(rng)), []  # slots out of phase
        for _ in range(services_per_slot):
            t += draw(rng)
            slot_ends.append(t)
        ends.append(slot_ends)
    horizon = min(slot_ends[-1] for slot_ends in ends)
    waits = []
    for _ in range(arrivals):
        at = rng.uniform(0.05 * horizon, 0.95 * horizon)
        waits.append(min(e[bisect.bisect_right(e, at)] - at for e in ends))
    return waits


@dataclass
class Light:
    latencies: list[float]
    waits: list[float]

    def figures(self) -> dict[str, Any]:
        return {"latency": latency_ms(self.latencies), "wait": latency_ms(self.waits)}


async def light_run(redis_url: str, flood: int, fifo: bool) -> Light:
    """A heavy backlog of ``flood`` requests, then the light tenant's requests one at a time
    every LIGHT_GAP_S; SLOTS slots serve. Returns the light requests' latency and wait."""
    store = await _store(redis_url)
    rng = random.Random(SEED)
    # As many tokens as the queue estimates (no default set: 256 output): no corrections.
    dispatch = Dispatch(output_tokens=256, service_ms=MEAN_SERVICE_S * 1000)
    stop = asyncio.Event()
    # FIFO baseline: everyone in one flow, so the order is plain arrival order.
    slots = [
        asyncio.create_task(dispatch.slot(store, lambda _: service_time(rng), stop))
        for _ in range(SLOTS)
    ]
    for _ in range(flood):
        await dispatch.submit(store, _request("everyone" if fifo else "heavy", 200))
    light_ids = []
    for _ in range(LIGHT_REQUESTS):
        light = _request("everyone" if fifo else "light", 200)
        light_ids.append(light.id)
        await dispatch.submit(store, light)
        await asyncio.sleep(LIGHT_GAP_S)
    while not all(i in dispatch.finished for i in light_ids):  # noqa: ASYNC110 (a bench poll)
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.gather(*slots)
    await store.redis.aclose()
    return Light(
        [dispatch.finished[i] - dispatch.submitted[i] for i in light_ids],
        [dispatch.started[i] - dispatch.submitted[i] for i in light_ids],
    )


def light_summary(runs: dict[str, Light], floor: Sequence[float]) -> dict[str, Any]:
    def p50(samples: Sequence[float]) -> float:
        return percentile(samples, 50)

    solo = p50(runs["alone"].latencies)
    expected_wait = statistics.fmean(floor)
    # The same floor as a p50: a light request's own service plus the wait, in the model.
    rng = random.Random(SEED + 1)
    model_solo = [service_time(rng) for _ in floor]
    model_flood = [s + w for s, w in zip(model_solo, floor, strict=True)]
    return {
        "slots": SLOTS,
        "service_ms": f"uniform {MEAN_SERVICE_S * 500:g} to {MEAN_SERVICE_S * 1500:g}",
        "heavy_backlog": HEAVY_BACKLOG,
        "light_requests": LIGHT_REQUESTS,
        **{name: run.figures() for name, run in runs.items()},
        "latency_ratio_fair": p50(runs["fair_flood"].latencies) / solo,
        "latency_ratio_floor": (solo + expected_wait) / solo,
        "latency_ratio_fifo": p50(runs["fifo_flood"].latencies) / solo,
        "floor": {
            "expected_wait_ms": expected_wait * 1000,
            "median_wait_ms": p50(floor) * 1000,
            "model_p50_ratio": p50(model_flood) / p50(model_solo),
            "formula": "(solo p50 latency + expected wait for the first of the busy slots to "
            "free) / solo p50 latency",
        },
    }


# ---- 2. Jain's index among backlogged tenants -----------------------------------------------

TOKENS_PER_SECOND = 8_000.0
WINDOW_S = 5.0
MODES = ("fifo", "fair", "fair+priority")


@dataclass(frozen=True)
class Tenant:
    name: str
    requests: int
    tokens: tuple[int, int]
    priority: int = request_pb2.PRIORITY_NORMAL
    gap_seconds: float = 0.0  # 0: the whole backlog arrives at once


BACKLOGGED = (
    Tenant("heavy", 400, (600, 1000), request_pb2.PRIORITY_BATCH),
    Tenant("team-a", 200, (300, 500)),
    Tenant("team-b", 600, (100, 300)),
)
LIGHT = Tenant("light", 60, (100, 200), request_pb2.PRIORITY_HIGH, gap_seconds=0.1)


def jain(values: Sequence[float]) -> float:
    """Jain's fairness index: 1.0 when all equal, 1/n when one gets everything."""
    total = sum(values)
    squares = sum(v * v for v in values)
    return total * total / (len(values) * squares) if squares else 1.0


@dataclass
class Shares:
    served: dict[str, float]
    light_waits: list[float]


async def jain_run(redis_url: str, mode: str) -> Shares:
    """Every tenant sends (the backlogged ones all at once); SLOTS slots serve each request
    for its token cost at TOKENS_PER_SECOND; tokens served per tenant within WINDOW_S."""
    tenants = [*BACKLOGGED, LIGHT]
    store = await _store(redis_url, default_output_tokens=0, priority_lead=20_000)
    rng = random.Random(11)
    owner: dict[str, str] = {}
    cost: dict[str, int] = {}
    dispatch = Dispatch()
    stop = asyncio.Event()
    began = time.perf_counter()

    async def send(tenant: Tenant) -> None:
        for _ in range(tenant.requests):
            request = _request(
                # FIFO: one flow for everyone, so the order is arrival order.
                "everyone" if mode == "fifo" else tenant.name,
                rng.randint(*tenant.tokens),
                tenant.priority if mode == "fair+priority" else request_pb2.PRIORITY_NORMAL,
            )
            owner[request.id] = tenant.name
            cost[request.id] = request.prompt_tokens
            await dispatch.submit(store, request)
            if tenant.gap_seconds:
                await asyncio.sleep(tenant.gap_seconds)

    def serve(lease: Lease) -> float:
        return lease.request.prompt_tokens / TOKENS_PER_SECOND

    senders = [asyncio.create_task(send(t)) for t in tenants]
    slots = [asyncio.create_task(dispatch.slot(store, serve, stop)) for _ in range(SLOTS)]
    await asyncio.sleep(WINDOW_S)
    stop.set()
    for task in senders:
        task.cancel()
    await asyncio.gather(*slots)
    await asyncio.gather(*senders, return_exceptions=True)
    await store.redis.aclose()
    served = {t.name: 0.0 for t in tenants}
    for request_id, finished in dispatch.finished.items():
        if finished - began < WINDOW_S:
            served[owner[request_id]] += cost[request_id]
    light_waits = [
        dispatch.started[i] - dispatch.submitted[i]
        for i, name in owner.items()
        if name == LIGHT.name and i in dispatch.started
    ]
    return Shares(served, light_waits)


def jain_summary(shares: dict[str, Shares]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode, result in shares.items():
        waits = result.light_waits
        out[mode] = {
            "jain_index_backlogged": jain([result.served[t.name] for t in BACKLOGGED]),
            "served_tokens": {name: round(v) for name, v in result.served.items()},
            "light_served": len(waits),
            "light_sent": round(WINDOW_S / LIGHT.gap_seconds),
            "light_wait_p50_ms": percentile(waits, 50) * 1000,
            "light_wait_p99_ms": percentile(waits, 99) * 1000,
        }
    return out


# ---- the scenario ---------------------------------------------------------------------------


def plot(
    shares: dict[str, Shares], light: dict[str, Light], floor: Sequence[float], saved: list[str]
) -> None:
    with plots.figure("fairness", 1, 2, size=(15, 5), saved=saved) as (served, cdf):
        tenants = [t.name for t in (*BACKLOGGED, LIGHT)]
        plots.bars(
            served,
            list(shares),
            {t: [shares[m].served[t] for m in shares] for t in tenants},
            ylabel=f"tokens served in {WINDOW_S:g} s",
            title="Who gets served: FIFO vs fair vs fair + priorities",
            fmt="{:.0f}",
        )
        labels = {
            "alone": "alone",
            "fair_flood": "heavy flood, fair",
            "fifo_flood": "heavy flood, FIFO",
        }
        for name, run in light.items():
            plots.cdf(cdf, [x * 1000 for x in run.latencies], labels[name])
        # The floor as a distribution: a latency measured alone plus a wait for a slot.
        alone = light["alone"].latencies
        plots.cdf(
            cdf,
            [(alone[i % len(alone)] + w) * 1000 for i, w in enumerate(floor)],
            "floor: alone + wait for the first busy slot to free",
            color="gray",
            dashed=True,
        )
        cdf.set_xscale("log")
        cdf.set_xlabel("light tenant latency (ms, log)")
        cdf.set_title(f"Light tenant's latency, {SLOTS} slots, {HEAVY_BACKLOG} heavy queued")
        cdf.legend(fontsize=8)


async def run() -> dict[str, Any]:
    with RedisServer(appendfsync="everysec") as redis:
        light = {
            "alone": await light_run(redis.url, flood=0, fifo=False),
            "fair_flood": await light_run(redis.url, flood=HEAVY_BACKLOG, fifo=False),
            "fifo_flood": await light_run(redis.url, flood=HEAVY_BACKLOG, fifo=True),
        }
        shares = {mode: await jain_run(redis.url, mode) for mode in MODES}
    floor = first_free_waits(SLOTS, service_time)
    light_figures = light_summary(light, floor)
    path = await full_path()
    saved: list[str] = []
    plot(shares, light, floor, saved)
    return {
        "light_tenant": light_figures,
        "jain": jain_summary(shares),
        "full_path": path,
        "goals": {
            "light_latency_ratio_fair": goal(
                light_figures["latency_ratio_fair"], GOAL_LIGHT_RATIO, at_most=True
            ),
            **{
                f"full_path_light_ratio_{shape}": goal(
                    figures["latency_ratio_p50"], GOAL_FULL_PATH_RATIO, at_most=True
                )
                for shape, figures in path.items()
            },
        },
        "note": "light: latency = wait + service, ratios of p50 latency to the light tenant "
        "alone; jain: over tokens served to the three backlogged tenants in the window; "
        "fair+priority: heavy is BATCH, light is HIGH",
        "plots": saved,
    }
