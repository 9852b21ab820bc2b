"""Usher against a naive round-robin proxy on the same emulated fleet and workload.

The fleet: three different Ollama instances (memory for 3, 2 and 1 of the four models;
120, 200 and 320 tokens/s; 3, 2 and 1 slots per model); loads cost 0.4 s. The workload: a
seeded sequence of requests over the four models with skewed popularity, sent in bursts by
24 concurrent clients. The naive path sends each request to the next instance in turn (each
Ollama queues what it cannot run, FIFO); Usher queues fairly, routes to instances that have
the model loaded and counts slots itself. Reported: throughput, p50/p99 end-to-end latency,
model loads and evictions (from the emulators), and a bar chart in bench/results/fleet.png
when matplotlib is installed."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from pathlib import Path
from typing import Any

import httpx

from bench.stats import emit, percentile
from clients.aio import AsyncUsherClient
from usher.testing.stack import LocalStack, StackConfig

MODELS = ("llama3.2:1b", "qwen2.5:0.5b", "gemma2:2b", "phi3:mini")
POPULARITY = (0.5, 0.25, 0.15, 0.10)
REQUESTS = 240
CLIENTS = 24
RESULTS = Path(__file__).resolve().parent / "results"


def _workload() -> list[str]:
    rng = random.Random(42)
    return rng.choices(MODELS, weights=POPULARITY, k=REQUESTS)


def _config() -> StackConfig:
    """Three different servers: a big slow one, a mid one, a small fast one."""
    models = ",".join(f"{m}@1GiB" for m in MODELS)
    common = ("--models", models, "--load-time", "0.4", "--output-tokens", "20:60")

    def server(memory: str, speed: int, slots: int) -> tuple[tuple[str, ...], str]:
        args = (
            *common,
            "--memory",
            memory,
            "--tokens-per-second",
            str(speed),
            "--parallel",
            str(slots),
        )
        return args, f";parallel={slots};memory={memory}"

    return StackConfig(
        model_servers=(
            server("3.5GiB", 120, 3),
            server("2.5GiB", 200, 2),
            server("1.5GiB", 320, 1),
        ),
        scheduler_env={"USHER_QUEUE_MAX_SIZE": "10000", "USHER_DISPATCH_CONCURRENCY": "16"},
    )


async def _emulator_counts(urls: list[str]) -> tuple[int, int]:
    loads = evictions = 0
    async with httpx.AsyncClient() as http:
        for url in urls:
            stats = (await http.get(f"{url}/_emulator/stats")).json()
            loads += int(stats["loads"])
            evictions += int(stats["evictions"])
    return loads, evictions


async def _drive(send: Any, work: list[str]) -> tuple[list[float], float]:
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    for item in enumerate(work):
        queue.put_nowait(item)
    latencies: list[float] = []

    async def client() -> None:
        while not queue.empty():
            i, model = queue.get_nowait()
            if i % 40 == 0:
                await asyncio.sleep(0.3)  # bursts
            started = time.perf_counter()
            await send(i, model)
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return latencies, time.perf_counter() - began


async def run() -> None:
    work = _workload()
    figures: dict[str, dict[str, float]] = {}
    # Naive: round robin straight to the instances.
    with LocalStack(_config()) as stack:
        urls = stack.model_urls
        turn = itertools.count()
        async with httpx.AsyncClient(timeout=300) as http:

            async def naive(i: int, model: str) -> None:
                url = urls[next(turn) % len(urls)]
                body = {"model": model, "prompt": f"q{i}", "stream": False}
                (await http.post(f"{url}/api/generate", json=body)).raise_for_status()

            latencies, seconds = await _drive(naive, work)
        loads, evictions = await _emulator_counts(urls)
        figures["naive round robin"] = _summary(latencies, seconds, loads, evictions)
    # Usher: the same fleet and workload through the trio.
    with LocalStack(_config()) as stack:
        client = AsyncUsherClient(
            stack.scheduler_address, stack.notifier_address, token="alice-token"
        )

        async def usher(i: int, model: str) -> None:
            await client.submit_and_wait(model, f"q{i}")

        latencies, seconds = await _drive(usher, work)
        await client.close()
        loads, evictions = await _emulator_counts(stack.model_urls)
        figures["usher"] = _summary(latencies, seconds, loads, evictions)
    for path, summary in figures.items():
        emit("fleet.compare", path=path, requests=REQUESTS, clients=CLIENTS, **summary)
    _plot(figures)


def _summary(
    latencies: list[float], seconds: float, loads: int, evictions: int
) -> dict[str, float]:
    return {
        "requests_per_second": len(latencies) / seconds,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "model_loads": loads,
        "evictions": evictions,
    }


def _plot(figures: dict[str, dict[str, float]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    names = list(figures)
    panels = (
        ("model_loads", "model loads"),
        ("p99_ms", "p99 latency (ms)"),
        ("requests_per_second", "requests/s"),
    )
    figure, axes = plt.subplots(1, len(panels), figsize=(12, 4))
    for axis, (key, title) in zip(axes, panels, strict=True):
        axis.bar(names, [figures[n][key] for n in names], color=["tab:gray", "tab:blue"])
        axis.set_title(title)
    figure.suptitle("Same fleet, same workload: naive round robin vs Usher")
    figure.savefig(RESULTS / "fleet.png", dpi=100, bbox_inches="tight")
    plt.close(figure)
