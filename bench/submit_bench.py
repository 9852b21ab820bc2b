"""Submit throughput and latency at concurrency 32 against one Scheduler process, with Redis
AOF ``appendfsync everysec`` and ``always`` (an extra scenario, ``submit``; deep-queue
figures are in ``scale``, the light tenant in ``fairness``)."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from typing import Any

import grpc

from bench.stats import latency_ms
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
) -> dict[str, Any]:
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
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "requests_per_second": len(latencies) / elapsed,
        **latency_ms(latencies),
    }


async def run() -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for appendfsync in ("everysec", "always"):
        with RedisServer(appendfsync=appendfsync) as redis:
            figures[f"aof_{appendfsync}"] = await submit_throughput(redis)
    figures["note"] = "one client process and one scheduler process on the same cores"
    return figures
