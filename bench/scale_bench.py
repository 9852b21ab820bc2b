"""Scale: deep queues, many watchers, and what each process holds in memory.

1. **queue ops**: with 10,000 and then 100,000 requests queued in one model (the
   Scheduler's store over Redis, no gRPC): enqueue rate, position lookup (Get) and claim
   p50/p99.
2. **10,000 watchers** on one Notifier (see ``bench/notifier_bench.py``): memory, token
   fan-out, a position storm, a completion burst.
3. **memory**: resident memory of each process of a stack (scheduler, pool, notifier,
   gateway, redis, emulator) idle, at its peak under load (the trio and the gateway at
   concurrency 32 at once) and just after."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from bench import plots
from bench.load import Trio, closed_loop, http_client, http_generate, rss_mb, stack_pids
from bench.notifier_bench import Fanout, fanout_latency
from bench.overhead_bench import stack_config
from bench.stats import latency_ms
from services.scheduler.store import NewRequest, QueueStore
from usher.connections import connect_redis
from usher.ids import new_request_id
from usher.queue.records import QueueDefaults
from usher.testing import RedisServer
from usher.testing.stack import LocalStack
from usher.v1 import request_pb2, scheduler_pb2

MODEL = "llama3.2"
DEPTHS = (10_000, 100_000)
LOAD_SECONDS = 10.0
LOAD_CONCURRENCY = 32

# ---- 1. queue ops ---------------------------------------------------------------------------


async def queue_ops(redis: RedisServer, queued: int, lookups: int = 2000) -> dict[str, Any]:
    """Fill one model's queue with ``queued`` requests (200 submits in flight), then time
    position lookups of random queued requests and claims from the head."""
    client = connect_redis(redis.url)
    await client.flushdb()
    store = QueueStore(client, QueueDefaults(max_queue_size=10**7))
    payload = scheduler_pb2.SubmitRequest(
        model=MODEL, generate=request_pb2.GenerateInput(prompt="x")
    ).SerializeToString()
    rng = random.Random(queued)
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
                    prompt_tokens=rng.randint(10, 2000),
                )
            )
        )
        if len(batch) == 200:
            await asyncio.gather(*batch)
            batch = []
    await asyncio.gather(*batch)
    fill_seconds = time.perf_counter() - filling
    if await store.queue_length(MODEL) != queued:
        raise RuntimeError("the queue does not hold what was submitted")
    positions = []
    for _ in range(lookups):
        request_id = rng.choice(ids)
        started = time.perf_counter()
        found = await store.get(request_id)
        positions.append(time.perf_counter() - started)
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
    return {
        "enqueue_per_second": queued / fill_seconds,
        "lookups": lookups,
        "position": latency_ms(positions, (50, 99)),
        "claim": latency_ms(claims, (50, 99)),
    }


# ---- 3. memory per process ------------------------------------------------------------------


async def memory() -> dict[str, Any]:
    with LocalStack(stack_config()) as stack:
        pids = stack_pids(stack)
        await asyncio.sleep(2.0)
        idle = rss_mb(pids)
        peak = dict(idle)
        trio = Trio(stack)
        async with http_client(LOAD_CONCURRENCY) as http:
            gateway = http_generate(http, stack.gateway_url, with_token=True)
            loads = asyncio.gather(
                closed_loop(trio, LOAD_CONCURRENCY, LOAD_SECONDS),
                closed_loop(gateway, LOAD_CONCURRENCY, LOAD_SECONDS),
            )
            while not loads.done():
                await asyncio.wait({loads}, timeout=0.5)
                for name, mb in rss_mb(pids).items():
                    peak[name] = max(peak.get(name, 0.0), mb)
            trio_load, gateway_load = await loads
        await trio.aclose()
        after = rss_mb(pids)
    return {
        "rss_mb": {
            name: {"idle": idle.get(name), "peak": peak.get(name), "after": after.get(name)}
            for name in pids
        },
        "load": {
            "seconds": LOAD_SECONDS,
            "trio": {"concurrency": LOAD_CONCURRENCY, **trio_load.figures(cpu=False)},
            "gateway": {"concurrency": LOAD_CONCURRENCY, **gateway_load.figures(cpu=False)},
        },
        "note": "idle = 2 s after start; peak = sampled every 0.5 s under load; after = just "
        "after the load ends",
    }


# ---- the scenario ---------------------------------------------------------------------------


def plot(
    ops: dict[int, dict[str, Any]],
    fanout: Fanout,
    rss: dict[str, dict[str, float | None]],
    saved: list[str],
) -> None:
    with plots.figure(
        "scale",
        1,
        3,
        size=(19, 5.2),
        title="Scale: deep queues, 10,000 watchers, memory",
        saved=saved,
    ) as (queue, watchers, mem):
        groups = [f"{op}\n{depth:,} queued" for op in ("position", "claim") for depth in ops]
        plots.bars(
            queue,
            groups,
            {
                q: [ops[depth][op][f"{q}_ms"] for op in ("position", "claim") for depth in ops]
                for q in ("p50", "p99")
            },
            ylabel="ms",
            title="queue operations (store over Redis)",
            fmt="{:.2f}",
        )
        for kind, samples in fanout.samples.items():
            plots.cdf(watchers, [s * 1000 for s in samples], f"{kind} (n={len(samples):,})")
        watchers.set_xscale("log")
        watchers.set_xlabel("update latency at the watcher (ms, log)")
        watchers.set_title(f"fan-out, {fanout.figures['watchers']['watchers']:,} watchers")
        watchers.legend(fontsize=8)
        names = list(rss)
        plots.bars(
            mem,
            names,
            {when: [rss[n][when] for n in names] for when in ("idle", "peak", "after")},
            ylabel="resident memory (MiB)",
            title=f"memory per process, idle and under load (c={LOAD_CONCURRENCY} trio + gateway)",
            fmt="{:.0f}",
        )


async def run() -> dict[str, Any]:
    with RedisServer(appendfsync="everysec") as redis:
        ops = {depth: await queue_ops(redis, depth) for depth in DEPTHS}
    fanout = await fanout_latency()
    mem = await memory()
    saved: list[str] = []
    plot(ops, fanout, mem["rss_mb"], saved)
    figures = dict(fanout.figures)
    goals = figures.pop("goals")
    return {
        "queue_ops": {
            **{f"{depth}_queued": op for depth, op in ops.items()},
            "note": "store level (no gRPC), 200 enqueues in flight; position = index lookup + "
            "one script (HGETALL, ZRANK, ZCARD); claim = pop + lease in one script",
        },
        **figures,
        "memory": mem,
        "goals": goals,
        "plots": saved,
    }
