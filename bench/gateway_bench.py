"""Gateway figures: requests/s and latency of Ollama-style ``POST /api/generate`` (stream
false) through the HTTP gateway and the whole trio, against calling the emulated model
server directly, at concurrency 1 and 32. The emulator runs in zero-delay mode, so what is
measured is Usher's own cost."""

from __future__ import annotations

import asyncio
import time

import httpx

from bench.stats import emit, percentile
from usher.testing.stack import LocalStack, StackConfig

MODEL = "llama3.2:1b"


async def _load(
    url: str, concurrency: int, seconds: float, token: str | None
) -> tuple[int, list[float], float]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits, headers=headers) as client:

        async def worker(w: int) -> None:
            n = 0
            while time.perf_counter() < deadline:
                n += 1
                body = {
                    "model": MODEL,
                    "prompt": f"w{w} q{n}",
                    "stream": False,
                    "options": {"num_predict": 8},
                }
                started = time.perf_counter()
                reply = await client.post(f"{url}/api/generate", json=body)
                reply.raise_for_status()
                latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        return len(latencies), latencies, time.perf_counter() - began


async def run() -> None:
    config = StackConfig(
        emulator_args=("--fleet", "2", "--instant", "--parallel", "64", "--output-tokens", "8:8"),
        instance_options=";parallel=64",
        scheduler_env={"USHER_DISPATCH_CONCURRENCY": "64", "USHER_QUEUE_MAX_SIZE": "100000"},
        gateway=True,
    )
    with LocalStack(config) as stack:
        direct = stack.model_urls[0]
        gateway = stack.gateway_url
        await _load(gateway, 4, 1.0, "alice-token")  # warm connections, caches, model loads
        await _load(direct, 4, 0.5, None)
        for concurrency in (1, 32):
            d_count, d_lat, d_time = await _load(direct, concurrency, 5.0, None)
            g_count, g_lat, g_time = await _load(gateway, concurrency, 8.0, "alice-token")
            emit(
                "gateway.overhead",
                concurrency=concurrency,
                direct_requests_per_second=d_count / d_time,
                gateway_requests_per_second=g_count / g_time,
                direct_p50_ms=percentile(d_lat, 50) * 1000,
                gateway_p50_ms=percentile(g_lat, 50) * 1000,
                gateway_p99_ms=percentile(g_lat, 99) * 1000,
                added_p50_ms=(percentile(g_lat, 50) - percentile(d_lat, 50)) * 1000,
                note="POST /api/generate stream=false; gateway → scheduler → pool → emulator and "
                "back through the notifier; every process on the same 2 cores",
            )
