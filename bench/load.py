"""Closed-loop load against a running stack, three ways in: the model server directly (HTTP),
the gRPC trio (Submit, then Watch until the final update) and the HTTP gateway; and what the
stack's processes spend meanwhile (CPU seconds, resident memory)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import httpx
import psutil  # type: ignore[import-untyped]
from google.protobuf import duration_pb2

from bench.stats import latency_ms
from usher.testing.stack import LocalStack
from usher.v1 import notifier_pb2, notifier_pb2_grpc, request_pb2, scheduler_pb2, scheduler_pb2_grpc

__all__ = [
    "MODEL",
    "USERS",
    "Call",
    "Load",
    "Trio",
    "auth",
    "closed_loop",
    "cpu_seconds",
    "emulator_stats",
    "http_chat",
    "http_client",
    "http_generate",
    "post_ok",
    "rss_mb",
    "stack_pids",
]

MODEL = "llama3.2:1b"
USERS = ("alice", "bob", "carol")
TERMINAL = frozenset(
    {
        notifier_pb2.UPDATE_KIND_COMPLETED,
        notifier_pb2.UPDATE_KIND_FAILED,
        notifier_pb2.UPDATE_KIND_CANCELLED,
        notifier_pb2.UPDATE_KIND_EXPIRED,
    }
)

#: One request of worker ``w`` (its ``n``-th): True when it completed.
Call = Callable[[int, int], Awaitable[bool]]


def auth(user: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {user}-token"),)


def prompt(worker: int, n: int) -> str:
    return f"worker {worker} question {n}: tell me about fair queues"


# ---- processes ------------------------------------------------------------------------------


def stack_pids(stack: LocalStack) -> dict[str, int]:
    """Process id of each part of a LocalStack that runs: scheduler, pool, notifier, gateway
    (or the one ``serve`` process of all four), redis and the emulated model servers (one
    ``emulator`` process for the fleet, or ``emulator-N`` for one process each)."""
    pids: dict[str, int] = {}
    if stack.serve is not None and stack.serve.process is not None:
        pids["serve"] = stack.serve.process.pid
    for name, proc in (
        ("scheduler", stack.schedulers[0].process if stack.schedulers else None),
        ("pool", stack.pool.process if stack.pool else None),
        ("notifier", stack.notifiers[0].process if stack.notifiers else None),
        ("gateway", stack.gateway.process if stack.gateway else None),
        ("redis", stack.redis.process if stack.redis else None),
    ):
        if proc is not None and proc.pid not in pids.values():
            pids[name] = proc.pid
    if stack.emulators is not None:
        pids["emulator"] = stack.emulators.pid
    for index, server in enumerate(stack.model_servers):
        pids[f"emulator-{index}"] = server.pid
    return pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (0 when it is gone)."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


async def emulator_stats(http: httpx.AsyncClient, urls: Sequence[str]) -> list[dict[str, Any]]:
    """Each emulated model server's counters (``GET /_emulator/stats``)."""
    replies = await asyncio.gather(*(http.get(f"{url}/_emulator/stats") for url in urls))
    return [dict(reply.json()) for reply in replies]


def rss_mb(pids: Mapping[str, int]) -> dict[str, float]:
    """Resident memory of each process, in MiB."""
    out: dict[str, float] = {}
    for name, pid in pids.items():
        try:
            out[name] = psutil.Process(pid).memory_info().rss / 2**20
        except psutil.Error:
            continue
    return out


# ---- the closed loop ------------------------------------------------------------------------


@dataclass
class Load:
    concurrency: int
    seconds: float
    latencies: list[float]
    failures: int
    #: CPU seconds each process spent during the run ("client" = this process).
    cpu: dict[str, float]

    @property
    def requests_per_second(self) -> float:
        return len(self.latencies) / self.seconds

    def figures(self, cpu: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "requests_per_second": self.requests_per_second,
            **latency_ms(self.latencies),
            "completed": len(self.latencies),
            "failed": self.failures,
        }
        if cpu:
            done = max(1, len(self.latencies))
            out["cpu_ms_per_request"] = {k: v * 1000 / done for k, v in self.cpu.items()}
            out["cpu_ms_per_request_total"] = sum(self.cpu.values()) * 1000 / done
        return out


async def closed_loop(
    call: Call, concurrency: int, seconds: float, pids: Mapping[str, int] | None = None
) -> Load:
    """``concurrency`` workers, each sending its next request when the previous one ended,
    for ``seconds``; CPU of ``pids`` (and of this process) over the same span."""
    latencies: list[float] = []
    failures = 0
    deadline = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal failures
        n = 0
        while time.perf_counter() < deadline:
            n += 1
            started = time.perf_counter()
            if await call(w, n):
                latencies.append(time.perf_counter() - started)
            else:
                failures += 1

    watched = dict(pids or {})
    before = {name: cpu_seconds(pid) for name, pid in watched.items()}
    own = time.process_time()
    began = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - began
    cpu = {name: cpu_seconds(pid) - before[name] for name, pid in watched.items()}
    cpu["client"] = time.process_time() - own
    return Load(concurrency, elapsed, latencies, failures, cpu)


# ---- the ways in ----------------------------------------------------------------------------


class Trio:
    """Submit (result only, awaiting its result) to the Scheduler, then, unless it answered
    with the end, AwaitResult on the Notifier for the final update: the SDK's
    submit_and_wait."""

    def __init__(self, stack: LocalStack) -> None:
        self._channels = [
            grpc.aio.insecure_channel(stack.scheduler_address),
            grpc.aio.insecure_channel(stack.notifier_address),
        ]
        self.scheduler = scheduler_pb2_grpc.SchedulerServiceStub(self._channels[0])
        self.notifier = notifier_pb2_grpc.NotifierServiceStub(self._channels[1])
        self._await_result = True

    async def __call__(self, worker: int, n: int) -> bool:
        user = USERS[worker % len(USERS)]
        try:
            submitted = await self.scheduler.Submit(
                scheduler_pb2.SubmitRequest(
                    model=MODEL,
                    generate=request_pb2.GenerateInput(prompt=prompt(worker, n)),
                    result_only=True,  # as the SDK's submit_and_wait submits
                    await_result=duration_pb2.Duration(seconds=30),
                ),
                metadata=auth(user),
                timeout=30,
            )
        except grpc.aio.AioRpcError:
            return False
        request = submitted.request
        if request.state == request_pb2.REQUEST_STATE_COMPLETED:
            return True
        if self._await_result:
            try:
                # As the SDK's submit_and_wait asks: the model as Submit answered it and
                # the final update alone, in one call.
                final = await self.notifier.AwaitResult(
                    notifier_pb2.AwaitResultRequest(id=request.id, model=request.model),
                    metadata=auth(user),
                    timeout=60,
                )
                return final.update.kind == notifier_pb2.UPDATE_KIND_COMPLETED
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    return False
                self._await_result = False
        # A Notifier older than AwaitResult (the anchor's): watch until the end, as its
        # SDK did.
        try:
            async for update in self.notifier.Watch(
                notifier_pb2.WatchRequest(id=request.id, final_only=True),
                metadata=auth(user),
                timeout=60,
            ):
                if update.kind in TERMINAL:
                    return update.kind == notifier_pb2.UPDATE_KIND_COMPLETED
        except grpc.aio.AioRpcError:
            return False
        return False

    async def aclose(self) -> None:
        for channel in self._channels:
            await channel.close()


def http_generate(client: aiohttp.ClientSession, url: str, with_token: bool) -> Call:
    """Ollama's ``POST /api/generate`` (stream false) at ``url``: the model server itself, or
    the gateway (then as one of the demo tenants, by worker)."""

    async def call(worker: int, n: int) -> bool:
        headers = (
            {"Authorization": f"Bearer {USERS[worker % len(USERS)]}-token"} if with_token else {}
        )
        body = {"model": MODEL, "prompt": prompt(worker, n), "stream": False}
        return await post_ok(client, f"{url}/api/generate", body, headers)

    return call


def http_client(concurrency: int) -> aiohttp.ClientSession:
    """One keep-alive connection per worker. aiohttp, as the peers were first measured
    with: it costs the load generator about half of httpx's CPU per call, and every process
    here shares the same two cores."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency),
        timeout=aiohttp.ClientTimeout(total=60),
    )


async def post_ok(
    client: aiohttp.ClientSession, url: str, body: Any, headers: Mapping[str, str]
) -> bool:
    """POST ``body`` as JSON, the answer read whole: whether it was a 200."""
    try:
        async with client.post(url, json=body, headers=headers) as reply:
            await reply.read()
            return reply.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


def http_chat(
    client: aiohttp.ClientSession,
    url: str,
    with_token: bool,
    api_key: str = "",
    stream: bool = False,
) -> Call:
    """OpenAI's ``POST /v1/chat/completions`` at ``url``: a model server, a gateway or a peer
    (LiteLLM, ollama-herd), as one of the demo tenants by worker when ``with_token``, else
    with ``api_key`` if given. ``stream``: the answer as server-sent events, read to its
    end (as a chat page reads it)."""

    async def call(worker: int, n: int) -> bool:
        user = USERS[worker % len(USERS)]
        key = f"{user}-token" if with_token else api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        body: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt(worker, n)}],
        }
        if stream:
            body["stream"] = True
        return await post_ok(client, f"{url}/v1/chat/completions", body, headers)

    return call


async def _child(
    url: str, concurrency: int, seconds: float, pids: dict[str, int], stream: bool
) -> None:
    async with http_client(concurrency) as http:
        call = http_chat(http, url, with_token=False, stream=stream)
        await closed_loop(call, min(8, concurrency), 1.5)  # warm up
        load = await closed_loop(call, concurrency, seconds, pids)
    print(json.dumps(dataclasses.asdict(load)))


if __name__ == "__main__":
    # ``python -m bench.load [--stream] URL CONCURRENCY SECONDS [NAME=PID ...]``: one closed
    # loop of OpenAI chat calls (streamed with --stream), its Load as JSON on stdout (run
    # inside another network namespace).
    _args = sys.argv[1:]
    _stream = _args[:1] == ["--stream"]
    _url, _concurrency, _seconds, *_pids = _args[1:] if _stream else _args
    asyncio.run(
        _child(
            _url,
            int(_concurrency),
            float(_seconds),
            {k: int(v) for k, _, v in (p.partition("=") for p in _pids)},
            _stream,
        )
    )
