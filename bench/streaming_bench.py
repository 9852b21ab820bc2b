"""Streaming at scale: STREAMS answers streamed at once, each generated at a real model's
pace (RATE tokens/s, TOKENS tokens), relayed model server → client three ways: directly
(the emulated Ollama itself), through the trio's HTTP gateway, and through ``usher serve``
(Ollama's ``POST /api/generate``, stream true). Both stacks run in the same run, one after
the other.

A token's delay is when it reached the client minus when the model server made it. The
server makes token ``i`` of a stream at ``t0 + i / RATE``; ``t0`` is taken as the earliest
that every token of the stream allows (``min(arrival_i - i / RATE)``), so a delay is a
lower bound, exact when any one token of the stream came through at once. Tokens that
arrive together in one chunk each count with their own delay. Reported per path: p50/p95/
p99 token delay, time to first token, streams completed, CPU ms per relayed token of each
process."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench import plots
from bench.load import MODEL, cpu_seconds, stack_pids
from bench.stats import goal, percentile
from usher.testing.stack import LocalStack, StackConfig

STREAMS = 500
RATE = 50.0
TOKENS = 100
GOAL_P99_MS = 100.0
PATHS = ("direct", "trio", "serve")


@dataclass
class Streams:
    delays: list[float] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)
    completed: int = 0
    tokens: int = 0
    cpu: dict[str, float] = field(default_factory=dict)


def stack_config(all_in_one: bool) -> StackConfig:
    return StackConfig(
        all_in_one=all_in_one,
        emulator_args=(
            "--fleet",
            "2",
            "--tokens-per-second",
            str(RATE),
            "--ttft",
            "0.05",
            "--load-time",
            "0",
            "--parallel",
            str(STREAMS),
            "--output-tokens",
            f"{TOKENS}:{TOKENS}",
        ),
        instance_options=f";parallel={STREAMS}",
        scheduler_env={
            "USHER_DISPATCH_CONCURRENCY": str(STREAMS + 16),
            "USHER_QUEUE_MAX_SIZE": "100000",
            "USHER_DEFAULT_PARALLEL": str(STREAMS),
        },
        gateway=True,
    )


def token_delays(arrivals: list[tuple[float, int]]) -> list[float]:
    """Each token's delay from ``(arrival time, tokens received so far)`` per chunk."""
    timed: list[tuple[float, int]] = []
    before = 0
    for at, total in arrivals:
        timed += [(at, i) for i in range(before, total)]
        before = total
    if not timed:
        return []
    start = min(at - i / RATE for at, i in timed)
    return [at - i / RATE - start for at, i in timed]


async def one_stream(http: aiohttp.ClientSession, url: str, n: int, out: Streams) -> None:
    body = {"model": MODEL, "prompt": f"stream {n}: tell me a story", "stream": True}
    headers = {"Authorization": f"Bearer {('alice', 'bob', 'carol')[n % 3]}-token"}
    arrivals: list[tuple[float, int]] = []
    text = ""
    sent = time.perf_counter()
    try:
        async with http.post(f"{url}/api/generate", json=body, headers=headers) as reply:
            async for line in reply.content:
                if not line.strip():
                    continue
                chunk = json.loads(line)
                piece = chunk.get("response", "")
                if piece:
                    text += piece
                    arrivals.append((time.perf_counter(), len(text.split())))
                if chunk.get("done"):
                    out.completed += 1
    except (aiohttp.ClientError, TimeoutError):
        return
    if arrivals:
        out.first_token.append(arrivals[0][0] - sent)
        out.delays += token_delays(arrivals)
        out.tokens += arrivals[-1][1]


async def stream_all(url: str, pids: dict[str, int]) -> Streams:
    out = Streams()
    # aiohttp: the lightest client here (httpx's CPU per chunk bounded the direct path).
    connector = aiohttp.TCPConnector(limit=STREAMS)
    timeout = aiohttp.ClientTimeout(total=180)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        await asyncio.gather(*(one_stream(http, url, n, Streams()) for n in range(8)))  # warm
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        await asyncio.gather(*(one_stream(http, url, n, out) for n in range(STREAMS)))
        out.cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    return out


def _figures(streams: Streams) -> dict[str, Any]:
    tokens = max(1, streams.tokens)
    return {
        "completed": streams.completed,
        "tokens": streams.tokens,
        **{
            f"token_delay_{q}_ms": percentile(streams.delays, p) * 1000
            for q, p in (("p50", 50), ("p95", 95), ("p99", 99))
        },
        "first_token_p50_ms": percentile(streams.first_token, 50) * 1000,
        "first_token_p99_ms": percentile(streams.first_token, 99) * 1000,
        "cpu_ms_per_token": {k: v * 1000 / tokens for k, v in streams.cpu.items()},
    }


async def run() -> dict[str, Any]:
    results: dict[str, Streams] = {}
    with LocalStack(stack_config(all_in_one=False)) as trio:
        results["direct"] = await stream_all(trio.model_urls[0], {})
        results["trio"] = await stream_all(trio.gateway_url, stack_pids(trio))
    with LocalStack(stack_config(all_in_one=True)) as serve:
        results["serve"] = await stream_all(serve.gateway_url, stack_pids(serve))
    summary: dict[str, Any] = {path: _figures(results[path]) for path in PATHS}
    summary["goals"] = {
        "serve_token_delay_p99_ms": goal(
            summary["serve"]["token_delay_p99_ms"], GOAL_P99_MS, at_most=True
        )
    }
    summary["note"] = (
        f"{STREAMS} streams at once, {RATE:.0f} tokens/s, {TOKENS} tokens each; a token's "
        "delay is a lower bound (the stream's least-delayed token taken as instant); the "
        "direct path's delays are the client's own"
    )
    saved: list[str] = []
    with plots.figure(
        "streaming",
        1,
        2,
        size=(13, 4.5),
        title=f"{STREAMS} concurrent streams at {RATE:.0f} tokens/s: token delay and TTFT",
        saved=saved,
    ) as (delay, first):
        for path in PATHS:
            plots.cdf(delay, [d * 1000 for d in results[path].delays], path)
            plots.cdf(first, [d * 1000 for d in results[path].first_token], path)
        delay.set_xlabel("token delay, model server → client (ms)")
        delay.set_ylabel("fraction of tokens")
        delay.legend()
        first.set_xlabel("time to first token (ms)")
        first.legend()
    summary["plots"] = saved
    return summary
