"""Fairness figures on the real queue (Redis + Lua scripts): Jain's index of served tokens
among backlogged tenants under fair queuing, with priority classes off and on, against FIFO;
and how long a light, interactive tenant waits meanwhile.

Dispatch slots claim in fair order and "serve" each request for its token cost at a fixed
speed, so the figures isolate the ordering, not the model server."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.stats import emit, percentile
from services.scheduler.store import FinishedWork, NewRequest, QueueDefaults, QueueStore
from usher.connections import connect_redis
from usher.ids import new_request_id
from usher.testing import RedisServer
from usher.v1 import request_pb2, scheduler_pb2

MODEL = "llama3.2"
TOKENS_PER_SECOND = 8_000.0
SLOTS = 4


@dataclass(frozen=True)
class Tenant:
    name: str
    requests: int
    tokens: tuple[int, int]
    priority: int = request_pb2.PRIORITY_NORMAL
    gap_seconds: float = 0.0  # 0: the whole backlog arrives at once


@dataclass
class Run:
    served: dict[str, float] = field(default_factory=dict)
    waits: dict[str, list[float]] = field(default_factory=dict)


def jain(values: list[float]) -> float:
    """Jain's fairness index: 1.0 when all equal, 1/n when one gets everything."""
    total = sum(values)
    squares = sum(v * v for v in values)
    return total * total / (len(values) * squares) if squares else 1.0


async def _run(redis_url: str, tenants: list[Tenant], mode: str, window: float) -> Run:
    client = connect_redis(redis_url)
    await client.flushdb()
    store = QueueStore(
        client, QueueDefaults(max_queue_size=10**6, default_output_tokens=0, priority_lead=20_000)
    )
    payload = scheduler_pb2.SubmitRequest(
        model=MODEL, generate=request_pb2.GenerateInput(prompt="x")
    ).SerializeToString()
    rng = random.Random(11)
    owner: dict[str, str] = {}
    submitted: dict[str, float] = {}
    run = Run({t.name: 0.0 for t in tenants}, {t.name: [] for t in tenants})
    stop = asyncio.Event()
    began = time.perf_counter()

    async def send(tenant: Tenant) -> None:
        for _ in range(tenant.requests):
            request = NewRequest(
                id=new_request_id(),
                model=MODEL,
                kind=request_pb2.REQUEST_KIND_GENERATE,
                # FIFO: one flow for everyone, so the order is arrival order.
                user="everyone" if mode == "fifo" else tenant.name,
                organization="acme",
                priority=tenant.priority
                if mode == "fair+priority"
                else request_pb2.PRIORITY_NORMAL,
                fallback=1,
                payload=payload,
                prompt_tokens=rng.randint(*tenant.tokens),
            )
            owner[request.id] = tenant.name
            submitted[request.id] = time.perf_counter()
            await store.submit(request)
            if tenant.gap_seconds:
                await asyncio.sleep(tenant.gap_seconds)

    async def slot() -> None:
        while not stop.is_set():
            lease = await store.claim(MODEL, "bench")
            if lease is None:
                await asyncio.sleep(0.002)
                continue
            name = owner[lease.request.id]
            run.waits[name].append(time.perf_counter() - submitted[lease.request.id])
            cost = lease.request.prompt_tokens
            await asyncio.sleep(cost / TOKENS_PER_SECOND)
            await store.finish(
                lease,
                FinishedWork(
                    state=request_pb2.REQUEST_STATE_COMPLETED, actual_tokens=cost, service_ms=1
                ),
            )
            if time.perf_counter() - began < window:
                run.served[name] += cost

    senders = [asyncio.create_task(send(t)) for t in tenants]
    slots = [asyncio.create_task(slot()) for _ in range(SLOTS)]
    await asyncio.sleep(window)
    stop.set()
    for task in senders:
        task.cancel()
    await asyncio.gather(*slots)
    await client.aclose()
    return run


async def run() -> None:
    backlogged = [
        Tenant("heavy", 400, (600, 1000), request_pb2.PRIORITY_BATCH),
        Tenant("team-a", 200, (300, 500)),
        Tenant("team-b", 600, (100, 300)),
    ]
    light = Tenant("light", 60, (100, 200), request_pb2.PRIORITY_HIGH, gap_seconds=0.1)
    window = 5.0
    served: dict[str, dict[str, float]] = {}
    with RedisServer(appendfsync="everysec") as redis:
        for mode in ("fifo", "fair", "fair+priority"):
            result = await _run(redis.url, [*backlogged, light], mode, window)
            served[mode] = result.served
            shares = [result.served[t.name] for t in backlogged]
            waits = result.waits["light"]
            emit(
                "fairness.jain",
                mode=mode,
                window_seconds=window,
                slots=SLOTS,
                served_tokens={t.name: round(result.served[t.name]) for t in [*backlogged, light]},
                jain_index_backlogged=jain(shares),
                light_requests_served=len(waits),
                light_requests_sent=round(window / light.gap_seconds),
                light_wait_p50_ms=percentile(waits, 50) * 1000 if waits else None,
                light_wait_p99_ms=percentile(waits, 99) * 1000 if waits else None,
                note="Jain's index over served tokens of the three backlogged tenants; "
                "fair+priority: heavy is BATCH, light is HIGH",
            )
    _plot(served)


def _plot(served: dict[str, dict[str, float]]) -> None:
    """Served tokens per tenant, one group of bars per mode (bench/results/fairness.png)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(parents=True, exist_ok=True)
    modes = list(served)
    tenants = list(next(iter(served.values())))
    figure, axis = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(tenants)
    for t, tenant in enumerate(tenants):
        axis.bar(
            [m + t * width for m in range(len(modes))],
            [served[mode][tenant] for mode in modes],
            width,
            label=tenant,
        )
    axis.set_xticks([m + width * (len(tenants) - 1) / 2 for m in range(len(modes))], modes)
    axis.set_ylabel("tokens served in the window")
    axis.set_title("Who gets served: FIFO vs fair queuing vs fair + priorities")
    axis.legend()
    figure.savefig(results / "fairness.png", dpi=100, bbox_inches="tight")
    plt.close(figure)
