"""Scheduler figures: Submit throughput and latency, position lookups in a deep queue, and a
light tenant's latency while a heavy tenant floods (fair queuing vs FIFO)."""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
import time

import grpc

from bench.stats import emit, percentile
from services.scheduler.store import FinishedWork, NewRequest, QueueDefaults, QueueStore
from usher.connections import connect_redis
from usher.ids import new_request_id
from usher.testing import RedisServer, ServiceProcess, free_port
from usher.v1 import request_pb2, scheduler_pb2, scheduler_pb2_grpc

TOKENS = "bench-token=bench@acme"
AUTH = (("authorization", "Bearer bench-token"),)
MODEL = "llama3.2"


def _scheduler(redis_url: str, port: int, log_dir: str) -> ServiceProcess:
    return ServiceProcess(
        "services.scheduler",
        port,
        {
            "USHER_REDIS_URL": redis_url,
            "USHER_SCHEDULER_LISTEN": f"127.0.0.1:{port}",
            "USHER_API_TOKENS": TOKENS,
            "USHER_QUEUE_MAX_SIZE": "1000000",
            "USHER_LOG_LEVEL": "warning",
        },
        log_path=os.path.join(log_dir, "scheduler.log"),
    )


async def submit_throughput(
    redis: RedisServer, concurrency: int = 32, seconds: float = 8.0
) -> None:
    port = free_port()
    with tempfile.TemporaryDirectory() as logs, _scheduler(redis.url, port, logs):
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        async def worker(w: int) -> None:
            n = 0
            while time.perf_counter() < deadline:
                n += 1
                request = scheduler_pb2.SubmitRequest(
                    model=MODEL, generate=request_pb2.GenerateInput(prompt=f"w{w} n{n} " * 20)
                )
                started = time.perf_counter()
                await stub.Submit(request, metadata=AUTH)
                latencies.append(time.perf_counter() - started)

        # Warm up connections and script caches, then measure.
        await stub.Submit(
            scheduler_pb2.SubmitRequest(
                model=MODEL, generate=request_pb2.GenerateInput(prompt="w")
            ),
            metadata=AUTH,
        )
        began = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - began
        await channel.close()
    emit(
        "scheduler.submit",
        concurrency=concurrency,
        requests=len(latencies),
        requests_per_second=len(latencies) / elapsed,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        redis_appendfsync=redis.appendfsync,
        note="one client process and one scheduler process on the same 2 cores",
    )


async def position_lookup(redis: RedisServer, queued: int = 10_000, lookups: int = 2000) -> None:
    client = connect_redis(redis.url)
    await client.flushdb()
    store = QueueStore(client, QueueDefaults(max_queue_size=10**7))
    payload = scheduler_pb2.SubmitRequest(
        model=MODEL, generate=request_pb2.GenerateInput(prompt="x")
    ).SerializeToString()
    ids: list[str] = []
    batch = []
    filling = time.perf_counter()
    for i in range(queued):
        request_id = new_request_id()
        ids.append(request_id)
        batch.append(
            store.submit(
                NewRequest(
                    id=request_id,
                    model=MODEL,
                    kind=request_pb2.REQUEST_KIND_GENERATE,
                    user=f"user{i % 50}",
                    organization="acme",
                    priority=i % 5 + 1,
                    fallback=1,
                    payload=payload,
                    prompt_tokens=random.randint(10, 2000),
                )
            )
        )
        if len(batch) == 200:
            await asyncio.gather(*batch)
            batch = []
    await asyncio.gather(*batch)
    fill_seconds = time.perf_counter() - filling
    assert await store.queue_length(MODEL) == queued
    latencies = []
    for _ in range(lookups):
        request_id = random.choice(ids)
        started = time.perf_counter()
        found = await store.get(request_id)
        latencies.append(time.perf_counter() - started)
        if found is None or found.position < 1:
            raise RuntimeError(f"request {request_id} lost its place")
    claims = []
    for _ in range(lookups):
        started = time.perf_counter()
        lease = await store.claim(MODEL, "bench")
        claims.append(time.perf_counter() - started)
        if lease is None:
            raise RuntimeError("the queue ran dry")
    await client.aclose()
    emit(
        "scheduler.queue_ops",
        queued=queued,
        enqueue_per_second=queued / fill_seconds,
        lookups=lookups,
        position_p50_ms=percentile(latencies, 50) * 1000,
        position_p99_ms=percentile(latencies, 99) * 1000,
        claim_p50_ms=percentile(claims, 50) * 1000,
        claim_p99_ms=percentile(claims, 99) * 1000,
        note="store level (no gRPC), 200 enqueues in flight; Get = index lookup + one script "
        "(HGETALL, ZRANK, ZCARD); claim = pop + lease in one script",
    )


async def _light_latencies(
    redis_url: str,
    flood: int,
    fifo: bool,
    parallel: int = 4,
    service_s: float = 0.05,
    light_requests: int = 30,
    light_gap_s: float = 0.12,
) -> tuple[list[float], list[float]]:
    """Run dispatch slots with a fixed service time; return light's (latencies, waits)."""
    client = connect_redis(redis_url)
    await client.flushdb()
    store = QueueStore(client, QueueDefaults(max_queue_size=10**6))
    payload = scheduler_pb2.SubmitRequest(
        model=MODEL, generate=request_pb2.GenerateInput(prompt="x")
    ).SerializeToString()
    rng = random.Random(7)
    submitted: dict[str, float] = {}
    started: dict[str, float] = {}
    finished: dict[str, float] = {}
    light_ids: list[str] = []
    stop = asyncio.Event()

    def request(user: str) -> NewRequest:
        # FIFO baseline: every request in one flow, so the order is plain arrival order.
        return NewRequest(
            id=new_request_id(),
            model=MODEL,
            kind=request_pb2.REQUEST_KIND_GENERATE,
            user="everyone" if fifo else user,
            organization="acme",
            priority=0,
            fallback=1,
            payload=payload,
            prompt_tokens=200,
        )

    async def slot() -> None:
        while not stop.is_set():
            lease = await store.claim(MODEL, "bench")
            if lease is None:
                await asyncio.sleep(0.002)
                continue
            started[lease.request.id] = time.perf_counter()
            # Service times vary (0.5x-1.5x) as real generations do; identical ones would keep
            # the slots finishing in lockstep.
            await asyncio.sleep(service_s * rng.uniform(0.5, 1.5))
            await store.finish(
                lease,
                FinishedWork(
                    state=request_pb2.REQUEST_STATE_COMPLETED,
                    actual_tokens=456,
                    service_ms=service_s * 1000,
                    output_tokens=256,
                ),
            )
            finished[lease.request.id] = time.perf_counter()

    slots = [asyncio.create_task(slot()) for _ in range(parallel)]
    for _ in range(flood):
        heavy = request("heavy")
        submitted[heavy.id] = time.perf_counter()
        await store.submit(heavy)
    for _ in range(light_requests):
        light = request("light")
        submitted[light.id] = time.perf_counter()
        light_ids.append(light.id)
        await store.submit(light)
        await asyncio.sleep(light_gap_s)
    while not all(i in finished for i in light_ids):  # noqa: ASYNC110 (a bench poll)
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.gather(*slots)
    await client.aclose()
    latencies = [finished[i] - submitted[i] for i in light_ids]
    waits = [started[i] - submitted[i] for i in light_ids]
    return latencies, waits


async def light_tenant(redis: RedisServer) -> None:
    service_s, parallel = 0.05, 4
    alone, alone_wait = await _light_latencies(redis.url, flood=0, fifo=False)
    fair, fair_wait = await _light_latencies(redis.url, flood=400, fifo=False)
    fifo, _ = await _light_latencies(redis.url, flood=400, fifo=True)

    def p50(xs: list[float]) -> float:
        return percentile(xs, 50) * 1000

    emit(
        "scheduler.light_tenant",
        parallel_slots=parallel,
        mean_service_ms=service_s * 1000,
        heavy_backlog=400,
        light_p50_latency_alone_ms=p50(alone),
        light_p50_latency_flood_fair_ms=p50(fair),
        light_p50_latency_flood_fifo_ms=p50(fifo),
        light_latency_ratio_fair=p50(fair) / p50(alone),
        light_latency_ratio_fifo=p50(fifo) / p50(alone),
        light_p50_wait_alone_ms=p50(alone_wait),
        light_p50_wait_flood_fair_ms=p50(fair_wait),
        light_p99_wait_flood_fair_ms=percentile(fair_wait, 99) * 1000,
        note="latency = queue wait + service; a saturated fleet must first free a slot",
    )


async def run() -> None:
    with RedisServer(appendfsync="everysec") as redis:
        await submit_throughput(redis)
        await position_lookup(redis)
        await position_lookup(redis, queued=100_000)
        await light_tenant(redis)
    with RedisServer(appendfsync="always") as redis:
        await submit_throughput(redis)
