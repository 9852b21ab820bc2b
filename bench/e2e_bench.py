"""End-to-end figures through all three services as separate processes (LocalStack) against
an emulated fleet in zero-delay mode: requests/s and latency from Submit to the final update
on the request's Watch stream, the latency Usher adds over calling the model server
directly, and where each service spends its CPU under load (py-spy, when installed)."""

from __future__ import annotations

import asyncio
import collections
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx

from bench.stats import emit, percentile
from usher.testing.stack import LocalStack, StackConfig
from usher.v1 import notifier_pb2, notifier_pb2_grpc, request_pb2, scheduler_pb2, scheduler_pb2_grpc

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
RESULTS = Path(__file__).resolve().parent / "results"
PROFILE_RATE = 100


def _auth(user: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {user}-token"),)


def _prompt(worker: int, n: int) -> str:
    return f"worker {worker} question {n}: tell me about fair queues"


@dataclass
class Clients:
    scheduler: scheduler_pb2_grpc.SchedulerServiceAsyncStub
    notifier: notifier_pb2_grpc.NotifierServiceAsyncStub
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    async def aclose(self) -> None:
        for channel in self.channels:
            await channel.close()


def _clients(stack: LocalStack) -> Clients:
    scheduler = grpc.aio.insecure_channel(stack.scheduler_address)
    notifier = grpc.aio.insecure_channel(stack.notifier_address)
    return Clients(
        scheduler_pb2_grpc.SchedulerServiceStub(scheduler),
        notifier_pb2_grpc.NotifierServiceStub(notifier),
        [scheduler, notifier],
    )


async def one_request(clients: Clients, user: str, prompt: str) -> int:
    """Submit, then Watch until the final update; returns that update's kind."""
    submitted = await clients.scheduler.Submit(
        scheduler_pb2.SubmitRequest(model=MODEL, generate=request_pb2.GenerateInput(prompt=prompt)),
        metadata=_auth(user),
        timeout=30,
    )
    async for update in clients.notifier.Watch(
        notifier_pb2.WatchRequest(id=submitted.request.id), metadata=_auth(user), timeout=60
    ):
        if update.kind in TERMINAL:
            return int(update.kind)
    raise RuntimeError(f"watch of {submitted.request.id} ended without a final update")


@dataclass
class LoadResult:
    concurrency: int
    seconds: float
    latencies: list[float]
    failures: int
    client_cpu_percent: float
    service_cpu_percent: dict[str, float]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc; 0 when unreadable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def _service_pids(stack: LocalStack) -> dict[str, int]:
    pids: dict[str, int] = {}
    for name, proc in (
        ("scheduler", stack.schedulers[0].process),
        ("pool", stack.pool.process if stack.pool else None),
        ("notifier", stack.notifiers[0].process),
        ("redis", stack.redis.process if stack.redis else None),
    ):
        if proc is not None:
            pids[name] = proc.pid
    if stack.emulators is not None:
        pids["emulator"] = stack.emulators.pid
    return pids


async def closed_loop(
    stack: LocalStack, concurrency: int, seconds: float, clients: Clients | None = None
) -> LoadResult:
    """``concurrency`` users, each submitting its next request when the previous finished."""
    own = clients is None
    active = clients or _clients(stack)
    latencies: list[float] = []
    failures = 0
    deadline = time.perf_counter() + seconds
    pids = _service_pids(stack)

    async def user(w: int) -> None:
        nonlocal failures
        n = 0
        while time.perf_counter() < deadline:
            n += 1
            started = time.perf_counter()
            try:
                kind = await one_request(active, USERS[w % len(USERS)], _prompt(w, n))
            except (grpc.aio.AioRpcError, RuntimeError):
                failures += 1
                continue
            if kind == notifier_pb2.UPDATE_KIND_COMPLETED:
                latencies.append(time.perf_counter() - started)
            else:
                failures += 1

    cpu_before = {name: _cpu_seconds(pid) for name, pid in pids.items()}
    own_before = time.process_time()
    began = time.perf_counter()
    await asyncio.gather(*(user(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - began
    own_cpu = time.process_time() - own_before
    service_cpu = {
        name: 100 * (_cpu_seconds(pid) - cpu_before[name]) / elapsed for name, pid in pids.items()
    }
    if own:
        await active.aclose()
    return LoadResult(
        concurrency, elapsed, latencies, failures, 100 * own_cpu / elapsed, service_cpu
    )


def _emit_load(name: str, result: LoadResult, **extra: Any) -> None:
    lat = result.latencies
    emit(
        name,
        concurrency=result.concurrency,
        seconds=result.seconds,
        completed=len(lat),
        failed=result.failures,
        requests_per_second=len(lat) / result.seconds,
        p50_ms=percentile(lat, 50) * 1000,
        p99_ms=percentile(lat, 99) * 1000,
        client_cpu_percent=result.client_cpu_percent,
        **{f"cpu_percent_{k}": v for k, v in result.service_cpu_percent.items()},
        cpu_ms_per_request={
            k: round(v * 10 * result.seconds / max(1, len(lat)), 2)
            for k, v in [*result.service_cpu_percent.items(), ("client", result.client_cpu_percent)]
        },
        **extra,
    )


async def direct_emulator(url: str, requests: int = 300) -> list[float]:
    """The same generation straight to the model server: POST /api/generate, stream false."""
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for n in range(requests + 20):
            started = time.perf_counter()
            reply = await client.post(
                "/api/generate",
                json={"model": MODEL, "prompt": _prompt(0, n), "stream": False},
            )
            reply.raise_for_status()
            if n >= 20:  # the first ones warm the connection up
                latencies.append(time.perf_counter() - started)
    return latencies


# ---- profiling ------------------------------------------------------------------------------

_LINE = re.compile(r":\d+\)$")


#: Leaf frame of a sample taken while the event loop waits for I/O.
IDLE_LEAF = "EpollSelector.select "
#: Frames left out of the inclusive ranking: process start-up and the event loop itself.
PLUMBING = (
    "runpy>",
    "asyncio/runners.py",
    "asyncio/base_events.py",
    "asyncio/events.py",
    "__main__.py",
    "threading.py",
    "run_service (usher/server.py)",
)


@dataclass
class Profile:
    samples: int
    idle_samples: int
    self_top: list[tuple[str, float]]
    inclusive_top: list[tuple[str, float]]


def summarize_collapsed(path: Path, top: int = 12) -> Profile:
    """Self and inclusive shares per function from py-spy's raw (collapsed) output."""
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_LINE.sub(")", frame) for frame in stack.split(";")]
        if frames[-1].startswith(IDLE_LEAF):
            idle += n  # the event loop waiting in epoll: not work
            continue
        total += n
        self_time[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    # Frames nearly every stack shares (the module, the event loop) say nothing.
    boring = {f for f in inclusive if any(part in f for part in PLUMBING)}

    def share(counter: collections.Counter[str], skip: set[str]) -> list[tuple[str, float]]:
        return [
            (f, round(100 * n / total, 1))
            for f, n in counter.most_common(top + len(skip))
            if f not in skip
        ][:top]

    return Profile(
        samples=total,
        idle_samples=idle,
        self_top=share(self_time, set()),
        inclusive_top=share(inclusive, boring),
    )


def _py_spy() -> str | None:
    """The py-spy binary (PATH or next to this Python); makes the results folder."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return None
    RESULTS.mkdir(parents=True, exist_ok=True)
    return spy


async def profile_under_load(
    stack: LocalStack, concurrency: int, seconds: float = 10.0
) -> dict[str, Profile] | None:
    spy = _py_spy()
    if spy is None:
        return None
    pids = _service_pids(stack)
    targets = {name: pids[name] for name in ("scheduler", "pool", "notifier")}
    load = asyncio.create_task(closed_loop(stack, concurrency, seconds + 3))
    await asyncio.sleep(1.5)
    outputs = {name: RESULTS / f"e2e-profile-{name}.txt" for name in targets}
    spies = [
        await asyncio.create_subprocess_exec(
            spy,
            "record",
            "--nonblocking",
            "-r",
            str(PROFILE_RATE),
            "-d",
            str(int(seconds)),
            "-f",
            "raw",
            "-o",
            str(outputs[name]),
            "--pid",
            str(pid),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for name, pid in targets.items()
    ]
    await asyncio.gather(*(s.wait() for s in spies))
    result = await load
    _emit_load("e2e.profiled_load", result, note="the load py-spy sampled (3 samplers running)")
    return {name: summarize_collapsed(path) for name, path in outputs.items() if path.exists()}


# ---- the scenario ---------------------------------------------------------------------------


def stack_config() -> StackConfig:
    return StackConfig(
        emulator_args=("--fleet", "2", "--instant", "--parallel", "64"),
        instance_options=";parallel=64",
        scheduler_env={"USHER_DISPATCH_CONCURRENCY": "64", "USHER_QUEUE_MAX_SIZE": "100000"},
        redis_appendfsync="everysec",
    )


async def run() -> None:
    with LocalStack(stack_config()) as stack:
        clients = _clients(stack)
        # Warm up: connections, script caches, the model load, the averages.
        await closed_loop(stack, 8, 2.0, clients)
        c32 = await closed_loop(stack, 32, 10.0, clients)
        _emit_load(
            "e2e.throughput",
            c32,
            goal_requests_per_second=1000,
            note="Submit -> Watch until COMPLETED; every process (3 services, Redis, "
            "emulator, this client) shares the same 2 cores",
        )
        c1 = await closed_loop(stack, 1, 6.0, clients)
        direct = await direct_emulator(stack.model_urls[0])
        e2e_p50 = percentile(c1.latencies, 50) * 1000
        direct_p50 = percentile(direct, 50) * 1000
        _emit_load(
            "e2e.latency_c1",
            c1,
            direct_p50_ms=direct_p50,
            direct_p99_ms=percentile(direct, 99) * 1000,
            added_p50_ms=e2e_p50 - direct_p50,
            added_p99_ms=percentile(c1.latencies, 99) * 1000 - percentile(direct, 99) * 1000,
            goal_added_p50_ms=3,
            note="direct = httpx POST /api/generate stream:false to the same emulator",
        )
        await clients.aclose()
        profiles = await profile_under_load(stack, 32)
        if profiles is None:
            emit("e2e.profile", skipped="py-spy not installed (pip install py-spy)")
            return
        for name, profile in profiles.items():
            emit(
                "e2e.profile",
                process=name,
                samples=profile.samples,
                loop_idle_samples=profile.idle_samples,
                top_self=[f"{pct}% {frame}" for frame, pct in profile.self_top],
                top_inclusive=[f"{pct}% {frame}" for frame, pct in profile.inclusive_top],
                raw=str(RESULTS / f"e2e-profile-{name}.txt"),
                note="py-spy --nonblocking, 100 Hz, 10 s; shares of non-idle samples; "
                "'Thread.run' leaves are gRPC's C-core poller thread, 'Handle._run' self time "
                "is Cython (grpc) and C callbacks run by the loop",
            )


def summarize(paths: Sequence[str]) -> None:
    """``python -m bench.e2e_bench FILE...``: summarize py-spy raw profiles."""
    for path in paths:
        profile = summarize_collapsed(Path(path))
        print(path, profile.samples, f"idle {profile.idle_samples}")
        for frame, pct in profile.self_top:
            print(f"  self {pct:5.1f}% {frame}")
        for frame, pct in profile.inclusive_top:
            print(f"  incl {pct:5.1f}% {frame}")


if __name__ == "__main__":
    summarize(sys.argv[1:])
