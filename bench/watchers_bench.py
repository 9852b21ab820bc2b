"""1,000 browsers waiting on one gateway: concurrent Server-Sent Event watchers of queued
requests (``GET /queue/requests/{id}/events`` with watch tokens, as the page's EventSource
does) while the queue moves.

200 requests are submitted through ``POST /queue/requests`` with the queue paused, five
watchers open on each (1,000 streams, in two client processes), then the queue is resumed
and drains through an emulated fleet. Measured:

* **update latency**: for updates with an event id (running, progress, completed) from the
  Redis stream entry that recorded the change (its id is its time) to the watcher reading
  the event; for every update, from the Notifier sending it (``at``) to the watcher reading
  it (the gateway's hop). Goal p99 ≤ 100 ms for the first.
* **memory per watcher**: the gateway's (and the Notifier's) resident memory with the
  1,000 streams open, less before they opened, divided by 1,000.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import os
import time
from array import array
from typing import Any

import aiohttp
import grpc

from bench.load import rss_mb
from bench.stats import goal, latency_ms
from usher.testing.sse import sse_events
from usher.testing.stack import LocalStack, StackConfig
from usher.v1 import scheduler_pb2, scheduler_pb2_grpc

MODEL = "llama3.2:1b"
REQUESTS = 200
WATCHERS_PER_REQUEST = 5
CLIENT_PROCESSES = 2
TENANTS = ("alice", "bob", "carol")
ADMIN = (("authorization", "Bearer admin-token"),)
#: How long the queue may take to drain before the run gives up on stragglers.
DRAIN_SECONDS = 120.0


def _stream_time(event_id: str) -> float:
    return int(event_id.split("-", 1)[0]) / 1000


async def _watch(
    session: aiohttp.ClientSession,
    url: str,
    opened: Any,
    changes: array[float],
    hops: array[float],
) -> int:
    """One watcher: read its stream to the end; the latency of each update."""
    events = 0
    async with session.get(url) as response:
        if response.status != 200:
            return -1
        with opened.get_lock():
            opened.value += 1
        async for event in sse_events(response):
            received = time.time()
            if event.event == "end":
                break
            if event.event != "message":
                continue
            body = event.json()
            events += 1
            if body.get("kind") == "snapshot":
                continue  # the state when it opened, not a change
            if event.id:
                changes.append(received - _stream_time(event.id))
            if body.get("at"):
                hops.append(received - float(body["at"]))
    return events


async def _watch_all(urls: list[str], opened: Any) -> tuple[array[float], array[float], int]:
    changes: array[float] = array("d")
    hops: array[float] = array("d")
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        results = await asyncio.gather(
            *(_watch(session, url, opened, changes, hops) for url in urls),
            return_exceptions=True,
        )
    failed = sum(1 for r in results if not isinstance(r, int) or r < 0)
    return changes, hops, failed


def _client(urls: list[str], opened: Any, out: multiprocessing.connection.Connection) -> None:
    """A client process: its share of the watchers, the latencies sent back at the end."""
    changes, hops, failed = asyncio.run(_watch_all(urls, opened))
    out.send((changes.tobytes(), hops.tobytes(), failed))
    out.close()


async def _submit_all(base: str) -> list[tuple[str, str]]:
    """The requests (id, watch token), submitted through the gateway."""
    submitted: list[tuple[str, str]] = []
    async with aiohttp.ClientSession(base_url=base) as session:
        for i in range(REQUESTS):
            tenant = TENANTS[i % len(TENANTS)]
            async with session.post(
                "/queue/requests",
                json={"model": MODEL, "messages": [{"role": "user", "content": f"wait {i}"}]},
                headers={"Authorization": f"Bearer {tenant}-token"},
            ) as reply:
                body = await reply.json()
                if reply.status != 202:
                    raise RuntimeError(f"submit refused: {reply.status} {body}")
                submitted.append((body["id"], body["watch_token"]))
    return submitted


async def _pause(stack: LocalStack, paused: bool) -> None:
    async with grpc.aio.insecure_channel(stack.scheduler_address) as channel:
        admin = scheduler_pb2_grpc.SchedulerAdminServiceStub(channel)
        await admin.PauseQueue(
            scheduler_pb2.PauseQueueRequest(model=MODEL, paused=paused), metadata=ADMIN
        )
        await admin.UpdateQueueConfig(
            scheduler_pb2.UpdateQueueConfigRequest(model=MODEL, max_queue_size=10_000),
            metadata=ADMIN,
        )


def _pids(stack: LocalStack) -> dict[str, int]:
    gateway, notifier = stack.gateway, stack.notifiers[0]
    assert gateway is not None
    assert gateway.process is not None
    assert notifier.process is not None
    return {"gateway": gateway.process.pid, "notifier": notifier.process.pid}


async def run() -> dict[str, Any]:
    config = StackConfig(
        emulator_args=(
            "--fleet",
            "1",
            "--models",
            MODEL,
            "--tokens-per-second",
            "60",
            "--load-time",
            "0.05",
            "--parallel",
            "4",
            "--output-tokens",
            "8:16",
        ),
        instance_options=";parallel=4",
        scheduler_env={"USHER_DISPATCH_CONCURRENCY": "8"},
    )
    with LocalStack(config) as stack:
        stack.start_gateway()
        base = stack.gateway_url
        await _pause(stack, True)
        submitted = await _submit_all(base)
        await asyncio.sleep(1.0)
        before = rss_mb(_pids(stack))
        urls = [
            f"{base}/queue/requests/{request_id}/events?watch_token={token}"
            for request_id, token in submitted
            for _ in range(WATCHERS_PER_REQUEST)
        ]
        context = multiprocessing.get_context("spawn")
        opened = context.Value("i", 0)
        clients = []
        for k in range(CLIENT_PROCESSES):
            receive, send = context.Pipe(duplex=False)
            process = context.Process(
                target=_client, args=(urls[k::CLIENT_PROCESSES], opened, send), daemon=True
            )
            process.start()
            clients.append((process, receive))
        began = time.monotonic()
        for _ in range(300):  # at most a minute for every stream to open
            if opened.value >= len(urls):
                break
            await asyncio.sleep(0.2)
        open_seconds = time.monotonic() - began
        connected = int(opened.value)
        await asyncio.sleep(2.0)  # settled: every snapshot sent
        during = rss_mb(_pids(stack))
        resumed = time.monotonic()
        await _pause(stack, False)
        changes: array[float] = array("d")
        hops: array[float] = array("d")
        failed = 0
        for process, receive in clients:
            deadline = resumed + DRAIN_SECONDS
            while not receive.poll(0.2):
                if time.monotonic() > deadline or not process.is_alive():
                    break
                await asyncio.sleep(0.2)
            if receive.poll(0):
                raw_changes, raw_hops, lost = receive.recv()
                changes.frombytes(raw_changes)
                hops.frombytes(raw_hops)
                failed += lost
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
        drained = time.monotonic() - resumed
    per_watcher_kb = {
        name: (during[name] - before.get(name, during[name])) * 1024 / max(connected, 1)
        for name in during
    }
    change_latency = latency_ms(list(changes))
    return {
        "watchers": len(urls),
        "connected": connected,
        "failed": failed,
        "requests": REQUESTS,
        "open_seconds": open_seconds,
        "drain_seconds": drained,
        "updates": len(hops),
        "updates_with_event_id": len(changes),
        "change_to_watcher": change_latency,
        "notifier_to_watcher": latency_ms(list(hops)),
        "rss_mb_before": before,
        "rss_mb_with_watchers": during,
        "kb_per_watcher": per_watcher_kb,
        "client_processes": CLIENT_PROCESSES,
        "cpu_count": os.cpu_count(),
        "goals": {
            "update_p99_ms": goal(change_latency["p99_ms"], 100, at_most=True),
            "all_connected": goal(connected, len(urls), at_most=False),
        },
    }
