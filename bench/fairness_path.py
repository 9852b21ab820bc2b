"""Fairness through the whole path: the HTTP gateway → Usher (the trio, then ``usher serve``)
→ an emulated Ollama with 2 slots and about 50 ms of generation per request. A light
tenant (carol, another organization) sends LIGHT requests one after another, alone and
while a heavy tenant (alice) keeps FLOOD requests in flight; the ratio of its p50 latency
under the flood to alone is what the hand-offs between a slot freeing and the next fair
request starting cost on top of the non-preemptive floor. Each light request's time is
split by its record (``split``): queued (created → started), generating (started →
finished) and outside the queue (the rest: HTTP, Submit, the answer's way back)."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from bench.stats import latency_ms
from usher.keys import ModelKeys
from usher.testing.stack import LocalStack, StackConfig

__all__ = ["full_path"]

MODEL = "llama3.2:1b"
SLOTS = 2
LIGHT = 20
FLOOD = 150
#: 5 tokens at 100 tokens/s: about 50 ms of generation.
EMULATOR_ARGS = (
    "--fleet",
    "1",
    "--tokens-per-second",
    "100",
    "--output-tokens",
    "5:5",
    "--ttft",
    "0",
    "--load-time",
    "0",
    "--parallel",
    str(SLOTS),
)


def _config(all_in_one: bool) -> StackConfig:
    return StackConfig(
        all_in_one=all_in_one,
        emulator_args=EMULATOR_ARGS,
        instance_options=f";parallel={SLOTS}",
        scheduler_env={"USHER_QUEUE_MAX_SIZE": "100000", "USHER_DEFAULT_PARALLEL": str(SLOTS)},
        gateway=True,
    )


#: One light request as answered: its id and its latency in seconds.
Answer = tuple[str, float]


async def _ask(http: aiohttp.ClientSession, url: str, user: str, n: int) -> Answer | None:
    body = {"model": MODEL, "prompt": f"{user} {n}", "stream": False}
    started = time.perf_counter()
    try:
        async with http.post(
            f"{url}/api/generate", json=body, headers={"Authorization": f"Bearer {user}-token"}
        ) as reply:
            await reply.read()
            ok = reply.status == 200
            request_id = reply.headers.get("X-Usher-Request-Id", "")
    except (aiohttp.ClientError, TimeoutError):
        return None
    return (request_id, time.perf_counter() - started) if ok else None


async def _light(http: aiohttp.ClientSession, url: str) -> list[Answer]:
    answers = [await _ask(http, url, "carol", n) for n in range(LIGHT)]
    return [a for a in answers if a is not None]


async def _split(redis_url: str, answers: list[Answer]) -> dict[str, float]:
    """Median ms queued, generating and outside the queue, and the share of requests that
    found a slot within 10 ms."""
    keys = ModelKeys(MODEL)
    client = aioredis.Redis.from_url(redis_url)
    queued: list[float] = []
    generating: list[float] = []
    outside: list[float] = []
    try:
        for request_id, seconds in answers:
            fields = ["created_ms", "started_ms", "finished_ms"]
            times = [t for t in await client.hmget(keys.request(request_id), fields) if t]
            if len(times) < len(fields):
                continue
            created, started, finished = (int(t) for t in times)
            queued.append(started - created)
            generating.append(finished - started)
            outside.append(seconds * 1000 - (finished - created))
    finally:
        await client.aclose()
    if not queued:
        return {}
    return {
        "queued_p50_ms": statistics.median(queued),
        "generating_p50_ms": statistics.median(generating),
        "outside_p50_ms": statistics.median(outside),
        "slot_within_10ms_share": sum(q <= 10 for q in queued) / len(queued),
    }


async def _case(url: str, redis_url: str) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=FLOOD + 8)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=300)
    ) as http:
        await _light(http, url)  # warm up
        alone = await _light(http, url)
        began = time.perf_counter()
        flood = [asyncio.create_task(_ask(http, url, "alice", n)) for n in range(FLOOD)]
        await asyncio.sleep(0.5)  # the heavy backlog is queued
        flooded = await _light(http, url)
        heavy = await asyncio.gather(*flood)
        flood_seconds = time.perf_counter() - began
    solo = latency_ms([seconds for _, seconds in alone])
    busy = latency_ms([seconds for _, seconds in flooded])
    return {
        "alone": solo,
        "under_flood": busy,
        "latency_ratio_p50": busy["p50_ms"] / solo["p50_ms"],
        # The heavy tenant's throughput: what holding slots for the light one costs it.
        "flood_answered_per_s": sum(a is not None for a in heavy) / flood_seconds,
        "split": {
            "alone": await _split(redis_url, alone),
            "under_flood": await _split(redis_url, flooded),
        },
    }


async def full_path() -> dict[str, Any]:
    """The light tenant alone and under the flood, through the trio and usher serve."""
    out: dict[str, Any] = {}
    for shape, all_in_one in (("trio", False), ("serve", True)):
        with LocalStack(_config(all_in_one)) as stack:
            out[shape] = await _case(stack.gateway_url, stack.redis_url)
    return out
