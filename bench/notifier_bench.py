"""10,000 concurrent Watch streams on one Notifier (part of the ``scale`` scenario): update
fan-out latency, and the Notifier's memory and CPU while they are open.

Redis, a Scheduler (with no Pool, so nothing dispatches) and one Notifier run as processes.
2,500 requests wait in five models' queues; four client processes each watch every request
once (10,000 streams over eight channels each). The bench process then plays dispatcher:

1. **moving queue**: cancels requests from the heads of the queues at a steady rate, so
   every queued watcher's position moves; latency of each CANCELLED update.
2. **streaming**: claims the rest (RUNNING), then appends token events at a steady rate,
   each carrying its send time; latency of each PROGRESS update.
3. **completion burst**: finishes every running request at once; latency of each
   COMPLETED update.

Latency is measured from the bench's own send time (the Cancel call, the token append, the
finish) to receipt at the watcher, all clocks on one machine; for terminal updates the
Redis event's time (``finished_at``, the script's clock in ms) is reported too.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import multiprocessing
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event as MpEvent
from typing import Any

import grpc
import psutil  # type: ignore[import-untyped]

from bench.load import TERMINAL, USERS
from bench.load import auth as _auth
from bench.stats import goal, percentile
from services.scheduler.store import FinishedWork, Lease, QueueStore
from usher.connections import connect_redis
from usher.queue.records import QueueDefaults
from usher.testing import RedisServer, ServiceProcess, free_port
from usher.testing.stack import DEFAULT_TOKENS
from usher.v1 import notifier_pb2, notifier_pb2_grpc, request_pb2, scheduler_pb2, scheduler_pb2_grpc

K = notifier_pb2
MODELS = tuple(f"bench-notify-{i}" for i in range(5))
CHANNELS_PER_PROCESS = 8
#: Streams a client process opens at once (waiting for each one's snapshot): a burst of
#: thousands of new calls makes gRPC cancel some before the server takes them.
OPENING_AT_ONCE = 200


# ---- the watcher processes ------------------------------------------------------------------


@dataclass
class WatcherReport:
    """What one client process saw (times are time.time() seconds)."""

    opened: int = 0
    failed: int = 0
    #: (request id, kind, received at, finished_at ms from the request)
    terminal: list[tuple[str, int, float, int]] = field(default_factory=list)
    #: (sent at, received at) of token updates, sent time read from the text
    progress: list[tuple[float, float]] = field(default_factory=list)
    #: receipt times of position updates
    positions: list[float] = field(default_factory=list)
    running: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)

    def record(self, request_id: str, update: K.WatchResponse, now: float) -> bool:
        """Note one update received at ``now``; True when it ends the watch."""
        kind = update.kind
        if kind == K.UPDATE_KIND_POSITION:
            self.positions.append(now)
        elif kind == K.UPDATE_KIND_PROGRESS:
            sent = update.text_delta.partition("sent=")[2].partition(";")[0]
            if sent:
                self.progress.append((float(sent), now))
        elif kind == K.UPDATE_KIND_RUNNING:
            self.running += 1
        elif kind in TERMINAL:
            finished = update.request.finished_at.ToMilliseconds()
            self.terminal.append((request_id, int(kind), now, finished))
            return True
        return False


async def _watch_all(
    address: str, requests: Sequence[tuple[str, str]], ready: MpEvent, stop: MpEvent
) -> WatcherReport:
    report = WatcherReport()
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.insecure_channel(address, options=options) for _ in range(CHANNELS_PER_PROCESS)
    ]
    stubs = [notifier_pb2_grpc.NotifierServiceStub(c) for c in channels]
    first = 0
    all_open = asyncio.Event()

    opening = asyncio.Semaphore(OPENING_AT_ONCE)

    async def watch(i: int, request_id: str, user: str) -> None:
        nonlocal first
        got_first = False
        await opening.acquire()
        try:
            call = stubs[i % len(stubs)].Watch(
                K.WatchRequest(id=request_id), metadata=_auth(user), timeout=600
            )
            async for update in call:
                now = time.time()
                if not got_first:
                    got_first = True
                    opening.release()
                    first += 1
                    if first == len(requests):
                        all_open.set()
                    continue  # the snapshot
                if report.record(request_id, update, now):
                    return
        except grpc.aio.AioRpcError as error:
            report.failed += 1
            report.errors[f"{error.code().name}: {(error.details() or '')[:80]}"] += 1
        finally:
            if not got_first:
                opening.release()
                first += 1
                if first == len(requests):
                    all_open.set()

    tasks = [asyncio.create_task(watch(i, r, u)) for i, (r, u) in enumerate(requests)]
    await all_open.wait()
    report.opened = len(requests) - report.failed
    # Thousands of open streams are long-lived objects: set them aside from the collector's
    # full walks, or its pauses in this client show up as the Notifier's tail latency.
    gc.freeze()
    ready.set()
    done = asyncio.ensure_future(asyncio.gather(*tasks))
    while not done.done() and not stop.is_set():
        await asyncio.wait({done}, timeout=0.2)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()
    return report


def watcher_process(
    address: str,
    requests: Sequence[tuple[str, str]],
    ready: MpEvent,
    stop: MpEvent,
    results: multiprocessing.Queue[WatcherReport],
) -> None:
    """Entry point of a client process: watch every request, report what arrived when."""
    results.put(asyncio.run(_watch_all(address, requests, ready, stop)))


# ---- the scenario ---------------------------------------------------------------------------


def _services(redis: RedisServer, logs: str) -> tuple[ServiceProcess, ServiceProcess]:
    common = {
        "USHER_REDIS_URL": redis.url,
        "USHER_API_TOKENS": DEFAULT_TOKENS,
        "USHER_LOG_LEVEL": "warning",
        "USHER_SHUTDOWN_GRACE_SECONDS": "1",
    }
    scheduler_port, notifier_port = free_port(), free_port()
    scheduler = ServiceProcess(
        "services.scheduler",
        scheduler_port,
        {
            **common,
            "USHER_SCHEDULER_LISTEN": f"127.0.0.1:{scheduler_port}",
            "USHER_QUEUE_MAX_SIZE": "100000",
            "USHER_QUEUE_TIMEOUT_SECONDS": "3600",
        },
        log_path=os.path.join(logs, "scheduler.log"),
    )
    notifier = ServiceProcess(
        "services.notifier",
        notifier_port,
        {**common, "USHER_NOTIFIER_LISTEN": f"127.0.0.1:{notifier_port}"},
        log_path=os.path.join(logs, "notifier.log"),
    )
    return scheduler, notifier


async def _submit_all(
    stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub, count: int
) -> list[tuple[str, str, str]]:
    """(id, user, model) of ``count`` queued requests, spread over the models and users."""
    out: list[tuple[str, str, str]] = []
    semaphore = asyncio.Semaphore(32)

    async def one(i: int) -> None:
        user, model = USERS[i % len(USERS)], MODELS[i % len(MODELS)]
        async with semaphore:
            reply = await stub.Submit(
                scheduler_pb2.SubmitRequest(
                    model=model, generate=request_pb2.GenerateInput(prompt=f"question {i}")
                ),
                metadata=_auth(user),
                timeout=30,
            )
        out.append((reply.request.id, user, model))

    await asyncio.gather(*(one(i) for i in range(count)))
    return out


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _ms(samples: Sequence[float], q: float) -> float:
    return percentile(samples, q) * 1000


@dataclass
class Fanout:
    """Figures per phase, and the latency samples (seconds) of each kind of update."""

    figures: dict[str, Any]
    samples: dict[str, list[float]]


async def _claim_all(store: QueueStore, cancelled: set[str]) -> list[Lease]:
    """Claim every queued request that was not cancelled (they then run for ever)."""
    leases: list[Lease] = []
    for model in MODELS:
        while (lease := await store.claim(model, "bench", lease_ms=600_000)) is not None:
            if lease.request.id not in cancelled:
                leases.append(lease)
    if not leases:
        raise RuntimeError("nothing left to run")
    return leases


def _terminal_latencies(
    reports: Sequence[WatcherReport], cancel_sent: dict[str, float], finish_sent: dict[str, float]
) -> tuple[list[float], list[float], list[float], list[float], int]:
    """CANCELLED and COMPLETED delivery latencies, from the call and from the Redis event,
    and how many opened watches never saw their end."""
    cancel_latency: list[float] = []
    cancel_from_event: list[float] = []
    complete_latency: list[float] = []
    complete_from_event: list[float] = []
    undelivered = 0
    for report in reports:
        for request_id, kind, received, finished_ms in report.terminal:
            if kind == K.UPDATE_KIND_CANCELLED and request_id in cancel_sent:
                cancel_latency.append(received - cancel_sent[request_id])
                cancel_from_event.append(received - finished_ms / 1000)
            elif kind == K.UPDATE_KIND_COMPLETED and request_id in finish_sent:
                complete_latency.append(received - finish_sent[request_id])
                complete_from_event.append(received - finished_ms / 1000)
        undelivered += report.opened - len(report.terminal)
    return cancel_latency, cancel_from_event, complete_latency, complete_from_event, undelivered


async def fanout_latency(
    requests: int = 2500,
    processes: int = 4,
    cancel_count: int = 250,
    cancel_rate: float = 50.0,
    token_events: int = 1000,
    token_rate: float = 100.0,
) -> Fanout:
    watchers = requests * processes
    context = multiprocessing.get_context("spawn")
    with (
        RedisServer(appendfsync="everysec") as redis,
        tempfile.TemporaryDirectory() as logs,
    ):
        scheduler, notifier = _services(redis, logs)
        scheduler.start()
        notifier.start()
        assert notifier.process is not None
        notifier_ps = psutil.Process(notifier.process.pid)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{scheduler.port}")
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        client = connect_redis(redis.url)
        store = QueueStore(client, QueueDefaults())
        try:
            queued = await _submit_all(stub, requests)
            # Queue order: cancel from the heads so every watcher behind moves up.
            by_model: dict[str, list[tuple[str, str]]] = {m: [] for m in MODELS}
            for request_id, user, model in queued:
                by_model[model].append((request_id, user))
            rss_before = notifier_ps.memory_info().rss
            ready = [context.Event() for _ in range(processes)]
            stop = context.Event()
            results: multiprocessing.Queue[WatcherReport] = context.Queue()
            pairs = [(r, u) for r, u, _ in queued]
            clients = [
                context.Process(
                    target=watcher_process,
                    args=(f"127.0.0.1:{notifier.port}", pairs, ready[p], stop, results),
                    daemon=True,
                )
                for p in range(processes)
            ]
            opening = time.perf_counter()
            for process in clients:
                process.start()
            loop = asyncio.get_running_loop()
            for event in ready:
                if not await loop.run_in_executor(None, event.wait, 180):
                    raise RuntimeError("watchers did not open within 180 s")
            open_seconds = time.perf_counter() - opening
            rss_open = notifier_ps.memory_info().rss
            # Idle with every stream open: what keeping 10,000 watchers costs by itself.
            cpu0 = _cpu(notifier_ps)
            await asyncio.sleep(4.0)
            idle_cpu = 100 * (_cpu(notifier_ps) - cpu0) / 4.0

            # 1. moving queue: cancel from the heads, round robin over the models.
            cancel_sent: dict[str, float] = {}
            heads = [
                by_model[MODELS[i % len(MODELS)]][i // len(MODELS)] for i in range(cancel_count)
            ]
            moving_started = time.time()
            cpu0 = _cpu(notifier_ps)
            for n, (request_id, user) in enumerate(heads):
                await asyncio.sleep(max(0.0, moving_started + n / cancel_rate - time.time()))
                cancel_sent[request_id] = time.time()
                await stub.Cancel(
                    scheduler_pb2.CancelRequest(id=request_id, reason="bench"),
                    metadata=_auth(user),
                )
            await asyncio.sleep(2.0)
            moving_ended = time.time()
            moving_seconds = moving_ended - moving_started
            moving_cpu = 100 * (_cpu(notifier_ps) - cpu0) / moving_seconds

            # 2. streaming: claim the rest, then token events at a steady rate.
            leases = await _claim_all(store, set(cancel_sent))
            await asyncio.sleep(3.0)  # the RUNNING updates settle
            phase_started = time.time()
            cpu0 = _cpu(notifier_ps)
            for n in range(token_events):
                await asyncio.sleep(max(0.0, phase_started + n / token_rate - time.time()))
                lease = leases[n % len(leases)]
                await store.progress(
                    lease, "tokens", {"text": f"sent={time.time():.6f};", "tokens": n + 1}
                )
            await asyncio.sleep(1.0)
            streaming_seconds = time.time() - phase_started
            streaming_cpu = 100 * (_cpu(notifier_ps) - cpu0) / streaming_seconds
            rss_streaming = notifier_ps.memory_info().rss

            # 3. completion burst: finish every running request at once.
            finish_sent: dict[str, float] = {}
            burst_started = time.time()
            cpu0 = _cpu(notifier_ps)
            semaphore = asyncio.Semaphore(32)

            async def finish(lease: Lease) -> None:
                async with semaphore:
                    finish_sent[lease.request.id] = time.time()
                    await store.finish(
                        lease,
                        FinishedWork(
                            state=request_pb2.REQUEST_STATE_COMPLETED,
                            result=request_pb2.RequestResult(text="done").SerializeToString(),
                            actual_tokens=100,
                            service_ms=1000.0,
                            output_tokens=50,
                        ),
                    )

            await asyncio.gather(*(finish(lease) for lease in leases))
            burst_send_seconds = time.time() - burst_started
            reports: list[WatcherReport] = []
            for _ in clients:
                reports.append(await loop.run_in_executor(None, results.get, True, 120))
            burst_seconds = time.time() - burst_started
            burst_cpu = 100 * (_cpu(notifier_ps) - cpu0) / burst_seconds
            rss_end = notifier_ps.memory_info().rss
            stop.set()
            for process in clients:
                process.join(10)
        finally:
            await channel.close()
            await client.aclose()
            notifier.terminate(timeout=5)
            scheduler.terminate(timeout=5)

    cancel_latency, cancel_from_event, complete_latency, complete_from_event, undelivered = (
        _terminal_latencies(reports, cancel_sent, finish_sent)
    )
    progress = [received - sent for r in reports for sent, received in r.progress]
    moving_positions = sum(moving_started <= t < moving_ended for r in reports for t in r.positions)
    figures: dict[str, Any] = {
        "watchers": {
            "watchers": watchers,
            "opened": sum(r.opened for r in reports),
            "client_processes": processes,
            "requests": requests,
            "models": len(MODELS),
            "open_seconds": open_seconds,
            "opens_per_second": watchers / open_seconds,
            "rss_before_mb": rss_before / 2**20,
            "rss_with_watchers_mb": rss_open / 2**20,
            "rss_per_watcher_kb": (rss_open - rss_before) / watchers / 1024,
            "rss_streaming_mb": rss_streaming / 2**20,
            "rss_end_mb": rss_end / 2**20,
            "idle_cpu_percent": idle_cpu,
            "watch_failures": sum(r.failed for r in reports),
            "watch_errors": dict(
                sum((r.errors for r in reports), collections.Counter()).most_common(3)
            ),
            "never_finished": undelivered,
            "note": "idle = every stream open, nothing happening",
        },
        "position_storm": {
            "cancels": len(cancel_sent),
            "cancel_rate_per_s": cancel_rate,
            "cancelled_updates": len(cancel_latency),
            "p50_ms": _ms(cancel_latency, 50),
            "p99_ms": _ms(cancel_latency, 99),
            "max_ms": _ms(cancel_latency, 100),
            "p99_from_redis_event_ms": _ms(cancel_from_event, 99),
            "position_updates": moving_positions,
            "position_updates_per_s": moving_positions / moving_seconds,
            "notifier_cpu_percent": moving_cpu,
            "note": "requests cancelled from the queues' heads: latency of CANCELLED from the "
            "Cancel call; every cancel moves all queued watchers of that model, whose "
            "positions are pushed every 0.2 s",
        },
        "token_fanout": {
            "running_updates": sum(r.running for r in reports),
            "token_events": token_events,
            "token_rate_per_s": token_rate,
            "progress_updates": len(progress),
            "p50_ms": _ms(progress, 50),
            "p99_ms": _ms(progress, 99),
            "max_ms": _ms(progress, 100),
            "notifier_cpu_percent": streaming_cpu,
            "note": f"each token event reaches the {processes} watchers of its request; "
            "latency from the append (send time carried in the text)",
        },
        "completion_burst": {
            "completed_requests": len(finish_sent),
            "completed_updates": len(complete_latency),
            "send_seconds": burst_send_seconds,
            "p50_ms": _ms(complete_latency, 50),
            "p99_ms": _ms(complete_latency, 99),
            "max_ms": _ms(complete_latency, 100),
            "p99_from_redis_event_ms": _ms(complete_from_event, 99),
            "notifier_cpu_percent": burst_cpu,
            "note": "every running request finished at once; latency of COMPLETED from the "
            "finish call",
        },
        "goals": {
            "token_fanout_p99_ms": goal(_ms(progress, 99), 100, at_most=True),
            "position_storm_p99_ms": goal(_ms(cancel_latency, 99), 100, at_most=True),
        },
    }
    samples = {
        "token": progress,
        "position storm (cancel)": cancel_latency,
        "completion burst": complete_latency,
    }
    return Fanout(figures, samples)
