"""Streaming at scale: STREAMS answers streamed at once, each generated at a real model's
pace (RATE tokens/s, TOKENS tokens), relayed model server → client three ways: directly
(the emulated Ollamas themselves), through the trio's HTTP gateway, and through ``usher
serve`` (Ollama's ``POST /api/generate``, stream true). Both stacks run in the same run, one
after the other.

Load generation is spread so the harness is not the bottleneck: the fleet's SERVERS
emulated Ollamas run one process each (the direct path spreads its streams over them as
Usher does), and the streams are read by CLIENTS client processes, each holding its share
of the streams, started together.

A token's delay is when it reached the client minus when the model server made it. The
server makes token ``i`` of a stream at ``t0 + i / RATE``; ``t0`` is taken as the earliest
that every token of the stream allows (``min(arrival_i - i / RATE)``), so a delay is a
lower bound, exact when any one token of the stream came through at once. Tokens that
arrive together in one chunk each count with their own delay. Reported per path: p50/p95/
p99 token delay, time to first token, streams completed, CPU ms per relayed token of each
process (the client processes' own CPU as ``clients``). Then ``usher serve``'s ceiling: the
same stack takes smaller bursts (CEILING_STREAMS), each with its p99 token delay, and the
most streams at once within the goal is reported.

``python -m bench.streaming_bench client URL... FIRST COUNT`` is one client process: it
warms up, prints ``ready``, waits for a line on stdin, streams COUNT answers (numbered from
FIRST, each to the URL it falls on) and prints its figures as one JSON line."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
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
#: Smaller bursts through ``usher serve`` after its main run, on the same stack.
CEILING_STREAMS = (100, 200, 300, 400)
#: Emulated model servers, one process each.
SERVERS = 2
#: Client processes the streams are spread over.
CLIENTS = 4
USERS = ("alice", "bob", "carol")
#: A client's figures come back as one JSON line (every token's delay: a few hundred KB).
RESULT_LINE_LIMIT = 64 * 2**20
#: The Pool's affinity routing sends a model's requests only to the servers it knows have
#: the model loaded: before Usher's paths run, the model is loaded on every server and the
#: Pool given a health pass (2 s) to see it, else the first server warmed up could take all
#: the streams (it has the slots) while the other stays idle.
LOADED_SEEN_SECONDS = 2.5


@dataclass
class Streams:
    delays: list[float] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)
    completed: int = 0
    tokens: int = 0
    cpu: dict[str, float] = field(default_factory=dict)

    def add(self, other: Streams) -> None:
        self.delays += other.delays
        self.first_token += other.first_token
        self.completed += other.completed
        self.tokens += other.tokens


def stack_config(all_in_one: bool) -> StackConfig:
    return StackConfig(
        all_in_one=all_in_one,
        emulator_args=(
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
        model_server_processes=SERVERS,
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


def count_words(words: int, ended_in_space: bool, piece: str) -> tuple[int, bool]:
    """Words in a text after ``piece`` is appended to one of ``words`` words (ending in
    whitespace or not): a word split across two pieces counts once. Linear in the piece, so
    a stream's tokens cost the same whatever its length."""
    if not piece:
        return words, ended_in_space
    added = len(piece.split())
    if added and words and not ended_in_space and not piece[0].isspace():
        added -= 1  # the piece continues the last word
    return words + added, piece[-1].isspace()


async def one_stream(http: aiohttp.ClientSession, url: str, n: int, out: Streams) -> None:
    body = {"model": MODEL, "prompt": f"stream {n}: tell me a story", "stream": True}
    headers = {"Authorization": f"Bearer {USERS[n % len(USERS)]}-token"}
    arrivals: list[tuple[float, int]] = []
    words, spaced = 0, True
    sent = time.perf_counter()
    try:
        async with http.post(f"{url}/api/generate", json=body, headers=headers) as reply:
            async for line in reply.content:
                if not line.strip():
                    continue
                chunk = json.loads(line)
                piece = chunk.get("response", "")
                if piece:
                    words, spaced = count_words(words, spaced, piece)
                    arrivals.append((time.perf_counter(), words))
                if chunk.get("done"):
                    out.completed += 1
    except (aiohttp.ClientError, TimeoutError):
        return
    if arrivals:
        out.first_token.append(arrivals[0][0] - sent)
        out.delays += token_delays(arrivals)
        out.tokens += arrivals[-1][1]


async def client(urls: list[str], first: int, count: int) -> None:
    """One client process: its streams, once the parent says go (a line on stdin)."""
    out = Streams()
    connector = aiohttp.TCPConnector(limit=count + 8)
    timeout = aiohttp.ClientTimeout(total=180)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        warm = [one_stream(http, urls[n % len(urls)], n, Streams()) for n in range(2)]
        await asyncio.gather(*warm)
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        own = time.process_time()
        await asyncio.gather(
            *(one_stream(http, urls[n % len(urls)], n, out) for n in range(first, first + count))
        )
        out.cpu = {"clients": time.process_time() - own}
    print(json.dumps(asdict(out)), flush=True)


async def load_everywhere(model_urls: list[str]) -> None:
    """The model loaded on every server (Ollama's load: a generate without a prompt)."""
    async with aiohttp.ClientSession() as http:
        for url in model_urls:
            async with http.post(f"{url}/api/generate", json={"model": MODEL}) as reply:
                await reply.read()
    await asyncio.sleep(LOADED_SEEN_SECONDS)


async def _result_line(child: asyncio.subprocess.Process) -> bytes:
    assert child.stdout is not None
    return await child.stdout.readline()


async def stream_all(urls: list[str], pids: dict[str, int], streams: int = STREAMS) -> Streams:
    """``streams`` streams spread over CLIENTS client processes (and over ``urls``)."""
    share = -(-streams // CLIENTS)
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.streaming_bench",
            "client",
            *urls,
            str(first),
            str(min(share, streams - first)),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=RESULT_LINE_LIMIT,
        )
        for first in range(0, streams, share)
    ]
    try:
        for child in children:  # each warmed up (its connections, the model loaded)
            assert child.stdout is not None
            ready = await child.stdout.readline()
            if ready.strip() != b"ready":
                raise RuntimeError(f"a streaming client failed to start: {ready!r}")
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        for child in children:
            assert child.stdin is not None
            child.stdin.write(b"go\n")
            await child.stdin.drain()
        # Read together: a child blocks writing its (long) line until it is read.
        lines = await asyncio.gather(*(_result_line(child) for child in children))
        out = Streams()
        clients_cpu = 0.0
        for line in lines:
            part = json.loads(line)
            clients_cpu += part.pop("cpu").get("clients", 0.0)
            out.add(Streams(**part))
        out.cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
        out.cpu["clients"] = clients_cpu
    finally:
        for child in children:
            if child.returncode is None:
                child.kill()
            await child.wait()
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


async def measure(paths: tuple[str, ...] = PATHS) -> tuple[dict[str, Streams], dict[int, Streams]]:
    """Each path's STREAMS streams, and ``usher serve``'s smaller bursts (by size)."""
    results: dict[str, Streams] = {}
    bursts: dict[int, Streams] = {}
    if "direct" in paths or "trio" in paths:
        with LocalStack(stack_config(all_in_one=False)) as trio:
            pids = stack_pids(trio)
            if "direct" in paths:
                servers = {k: v for k, v in pids.items() if k.startswith("emulator")}
                results["direct"] = await stream_all(trio.model_urls, servers)
            if "trio" in paths:
                await load_everywhere(trio.model_urls)
                results["trio"] = await stream_all([trio.gateway_url], pids)
    if "serve" in paths:
        with LocalStack(stack_config(all_in_one=True)) as serve:
            await load_everywhere(serve.model_urls)
            results["serve"] = await stream_all([serve.gateway_url], stack_pids(serve))
            for streams in CEILING_STREAMS:
                bursts[streams] = await stream_all([serve.gateway_url], stack_pids(serve), streams)
    return results, bursts


def cores_at_rate(cpu_ms_per_token: dict[str, float], tokens_per_second: float) -> dict[str, float]:
    """The cores each process needs (CPU seconds per second) to relay ``tokens_per_second``
    at the CPU per token it was measured at, and their ``total``: beside the machine's
    cores, whether a path can keep up at all."""
    cores = {name: ms * tokens_per_second / 1000 for name, ms in cpu_ms_per_token.items()}
    cores["total"] = sum(cores.values())
    return cores


def ceiling(p99_ms_by_streams: dict[int, float], goal_ms: float = GOAL_P99_MS) -> int:
    """The most streams at once whose p99 token delay is within ``goal_ms`` (0: none), from
    bursts of several sizes (each measured on its own)."""
    return max((n for n, p99 in p99_ms_by_streams.items() if p99 <= goal_ms), default=0)


async def run() -> dict[str, Any]:
    results, bursts = await measure()
    summary: dict[str, Any] = {path: _figures(results[path]) for path in PATHS}
    by_streams = {n: percentile(b.delays, 99) * 1000 for n, b in bursts.items()}
    by_streams[STREAMS] = summary["serve"]["token_delay_p99_ms"]
    summary["serve_ceiling"] = {
        "token_delay_p99_ms_by_streams": {str(n): by_streams[n] for n in sorted(by_streams)},
        "first_token_p50_ms_by_streams": {
            str(n): percentile(b.first_token, 50) * 1000 for n, b in sorted(bursts.items())
        },
        "cpu_ms_per_token_by_streams": {
            str(n): _figures(b)["cpu_ms_per_token"].get("serve", 0.0)
            for n, b in sorted(bursts.items())
        },
        "streams_within_goal": ceiling(by_streams),
    }
    # What each path would need at the goal's rate, by process, next to what there is:
    # the harness's own share (emulators, clients, Redis) shows whether the goal fits here.
    summary["cores_at_goal_rate"] = {
        path: cores_at_rate(summary[path]["cpu_ms_per_token"], STREAMS * RATE) for path in PATHS
    }
    summary["machine_cores"] = os.cpu_count() or 1
    summary["goals"] = {
        "serve_token_delay_p99_ms": goal(
            summary["serve"]["token_delay_p99_ms"], GOAL_P99_MS, at_most=True
        )
    }
    summary["note"] = (
        f"{STREAMS} streams at once, {RATE:.0f} tokens/s, {TOKENS} tokens each, read by "
        f"{CLIENTS} client processes from {SERVERS} emulated Ollamas (a process each); a "
        "token's delay is a lower bound (the stream's least-delayed token taken as instant); "
        "the direct path is the harness's own ceiling; serve_ceiling: smaller bursts on the "
        "same serve stack, and the most streams at once within the goal; cores_at_goal_rate: "
        "the cores each process would need at the goal's rate, at its measured CPU per token "
        "(beside machine_cores)"
    )
    saved: list[str] = []
    with plots.figure(
        "streaming",
        1,
        3,
        size=(18, 4.5),
        title=f"{STREAMS} concurrent streams at {RATE:.0f} tokens/s: token delay and TTFT",
        saved=saved,
    ) as (delay, first, sizes):
        for path in PATHS:
            plots.cdf(delay, [d * 1000 for d in results[path].delays], path)
            plots.cdf(first, [d * 1000 for d in results[path].first_token], path)
        delay.set_xlabel("token delay, model server → client (ms)")
        delay.set_ylabel("fraction of tokens")
        delay.legend()
        first.set_xlabel("time to first token (ms)")
        first.legend()
        counts = sorted(by_streams)
        sizes.plot(counts, [by_streams[n] for n in counts], marker="o", label="usher serve p99")
        sizes.axhline(GOAL_P99_MS, linestyle="--", color="grey", label="goal")
        sizes.set_xlabel("streams at once")
        sizes.set_ylabel("p99 token delay (ms)")
        sizes.legend()
    summary["plots"] = saved
    return summary


if __name__ == "__main__":
    if len(sys.argv) >= 5 and sys.argv[1] == "client":
        *targets, start, size = sys.argv[2:]
        asyncio.run(client(targets, int(start), int(size)))
    else:
        sys.exit("usage: python -m bench.streaming_bench client URL... FIRST COUNT")
