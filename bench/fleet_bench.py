"""Usher against a naive round-robin proxy on the same emulated fleet and workload.

The fleet: three different Ollama instances (memory for 3, 2 and 1 of the four models;
120, 200 and 320 tokens/s; 3, 2 and 1 slots per model); loads cost 0.4 s. The workload: a
seeded sequence of requests over the four models with skewed popularity, sent in bursts by
24 concurrent clients. The naive path sends each request to the next instance in turn (each
Ollama queues what it cannot run, FIFO); Usher queues fairly, routes to instances that have
the model loaded and counts slots itself. Reported per path: throughput, p50/p99 queue wait
and end-to-end latency, slot utilization, model loads and evictions (from the emulators);
plots in bench/results/fleet.png.

Queue wait = from arrival until the request's generation could begin, model load included:
Ollama's ``load_duration`` on the naive path (it counts from the request's arrival at the
server), the Scheduler's queue wait plus the load reported on Usher's path."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench import plots
from bench.load import emulator_stats
from bench.stats import latency_ms
from clients.aio import AsyncUsherClient
from usher.testing.stack import LocalStack, StackConfig

MODELS = ("llama3.2:1b", "qwen2.5:0.5b", "gemma2:2b", "phi3:mini")
POPULARITY = (0.5, 0.25, 0.15, 0.10)
REQUESTS = 240
CLIENTS = 24
#: (memory, tokens/s, slots per model) of each server; every model takes 1 GiB.
SERVERS = (("3.5GiB", 120, 3), ("2.5GiB", 200, 2), ("1.5GiB", 320, 1))
#: The most generations the fleet can run at once: slots per model x models that fit.
CAPACITY = sum(slots * int(float(memory.removesuffix("GiB"))) for memory, _, slots in SERVERS)
PATHS = ("naive round robin", "usher")


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
        model_servers=tuple(server(*spec) for spec in SERVERS),
        scheduler_env={"USHER_QUEUE_MAX_SIZE": "10000", "USHER_DISPATCH_CONCURRENCY": "16"},
    )


@dataclass
class Outcome:
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    #: Generations running fleet-wide, sampled every 0.1 s while the workload runs.
    running: list[int] = field(default_factory=list)
    loads: int = 0
    evictions: int = 0

    def figures(self) -> dict[str, Any]:
        mean_running = sum(self.running) / max(1, len(self.running))
        return {
            "requests_per_second": len(self.latencies) / self.seconds,
            "latency": latency_ms(self.latencies, (50, 99)),
            "queue_wait": latency_ms(self.waits, (50, 99)),
            "mean_generations_running": mean_running,
            "slot_utilization": mean_running / CAPACITY,
            "model_loads": self.loads,
            "evictions": self.evictions,
            "completed": len(self.latencies),
        }


#: Send request ``i`` for ``model``; returns its queue wait in seconds.
Send = Callable[[int, str], Awaitable[float]]


async def _drive(send: Send, work: list[str], urls: Sequence[str]) -> Outcome:
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    for item in enumerate(work):
        queue.put_nowait(item)
    outcome = Outcome()
    done = asyncio.Event()

    async def client() -> None:
        while not queue.empty():
            i, model = queue.get_nowait()
            if i % 40 == 0:
                await asyncio.sleep(0.3)  # bursts
            started = time.perf_counter()
            outcome.waits.append(await send(i, model))
            outcome.latencies.append(time.perf_counter() - started)

    async def sampler(http: httpx.AsyncClient) -> None:
        while not done.is_set():
            stats = await emulator_stats(http, urls)
            outcome.running.append(sum(int(s["in_flight"]) for s in stats))
            await asyncio.sleep(0.1)

    async with httpx.AsyncClient(timeout=10) as http:
        for url in urls:
            await http.delete(f"{url}/_emulator/stats")
        sampling = asyncio.create_task(sampler(http))
        began = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(CLIENTS)))
        outcome.seconds = time.perf_counter() - began
        done.set()
        await sampling
        stats = await emulator_stats(http, urls)
    outcome.loads = sum(int(s["loads"]) for s in stats)
    outcome.evictions = sum(int(s["evictions"]) for s in stats)
    return outcome


async def naive_round_robin(work: list[str]) -> Outcome:
    """Each request to the next server in turn, straight to its Ollama API."""
    with LocalStack(_config()) as stack:
        urls = stack.model_urls
        turn = itertools.count()
        async with httpx.AsyncClient(timeout=300) as http:

            async def send(i: int, model: str) -> float:
                url = urls[next(turn) % len(urls)]
                body = {"model": model, "prompt": f"q{i}", "stream": False}
                reply = await http.post(f"{url}/api/generate", json=body)
                reply.raise_for_status()
                return float(reply.json()["load_duration"]) / 1e9

            return await _drive(send, work, urls)


async def through_usher(work: list[str]) -> Outcome:
    """The same fleet and workload through the trio (the SDK: submit, wait)."""
    with LocalStack(_config()) as stack:
        client = AsyncUsherClient(
            stack.scheduler_address, stack.notifier_address, token="alice-token"
        )

        async def send(i: int, model: str) -> float:
            request = await client.submit_and_wait(model, f"q{i}")
            usage = request.usage
            return usage.queue_wait_seconds + usage.load_seconds if usage else float("nan")

        try:
            return await _drive(send, work, stack.model_urls)
        finally:
            await client.close()


async def run() -> dict[str, Any]:
    work = _workload()
    outcomes = {PATHS[0]: await naive_round_robin(work), PATHS[1]: await through_usher(work)}
    saved: list[str] = []
    _plot(outcomes, saved)
    usher, naive = (outcomes[p].figures() for p in ("usher", "naive round robin"))
    return {
        "requests": REQUESTS,
        "clients": CLIENTS,
        "fleet_capacity": CAPACITY,
        "usher": usher,
        "naive_round_robin": naive,
        "usher_over_naive_rps": usher["requests_per_second"] / naive["requests_per_second"],
        "note": "queue wait = arrival until generation could begin, model load included; "
        f"slot utilization = mean generations running / {CAPACITY} (slots per model x models "
        "that fit, summed over the servers)",
        "plots": saved,
    }


def _plot(outcomes: dict[str, Outcome], saved: list[str]) -> None:
    figures = {path: outcome.figures() for path, outcome in outcomes.items()}
    names = list(figures)
    with plots.figure(
        "fleet",
        2,
        3,
        size=(17, 9),
        title=f"Same fleet, same workload ({REQUESTS} requests, {CLIENTS} clients): "
        "naive round robin vs Usher",
        saved=saved,
    ) as (rps, latency, wait, loads, slots, cdf):
        plots.bars(
            rps,
            names,
            {"requests/s": [figures[n]["requests_per_second"] for n in names]},
            title="throughput (requests/s)",
            fmt="{:.1f}",
        )
        for axis, key, title in (
            (latency, "latency", "end-to-end latency (ms)"),
            (wait, "queue_wait", "queue wait incl. model loads (ms)"),
        ):
            plots.bars(
                axis,
                names,
                {q: [figures[n][key][f"{q}_ms"] for n in names] for q in ("p50", "p99")},
                title=title,
                fmt="{:.0f}",
            )
        plots.bars(
            loads,
            names,
            {
                "model loads": [figures[n]["model_loads"] for n in names],
                "evictions": [figures[n]["evictions"] for n in names],
            },
            title="model loads and evictions",
            fmt="{:.0f}",
        )
        plots.bars(
            slots,
            names,
            {"slot utilization": [100 * figures[n]["slot_utilization"] for n in names]},
            title=f"slot utilization (% of {CAPACITY} slots)",
            fmt="{:.0f}%",
        )
        for name, outcome in outcomes.items():
            plots.cdf(cdf, outcome.latencies, name)
        cdf.set_xlabel("end-to-end latency (s)")
        cdf.set_title("latency CDF")
        cdf.legend(fontsize=8)
