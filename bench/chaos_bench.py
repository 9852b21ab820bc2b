"""Chaos: a steady stream of requests while the Scheduler, the Pool, the Notifier and Redis
(AOF, appendfsync always) are SIGKILLed and restarted at random. Reports accepted vs
finished (must be equal: nothing lost), duplicate events delivered to watchers (must be 0)
and how long each kind of outage lasted for clients (recovery time)."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import defaultdict

from bench.stats import emit, percentile
from clients.aio import AsyncUsherClient
from clients.errors import UsherError
from clients.retry import RetryPolicy
from usher.testing.stack import LocalStack, StackConfig

MODEL = "llama3.2:1b"
VICTIMS = ("scheduler", "pool", "notifier", "redis", "model server")


async def run(total: int = 1000, per_second: float = 40.0) -> None:
    config = StackConfig(
        redis_appendfsync="always",
        model_server_processes=2,
        emulator_args=(
            "--tokens-per-second",
            "400",
            "--load-time",
            "0.05",
            "--parallel",
            "4",
            "--output-tokens",
            "10:40",
        ),
        instance_options=";parallel=4",
        scheduler_env={
            "USHER_LEASE_SECONDS": "2",
            "USHER_REAP_INTERVAL_SECONDS": "0.1",
            "USHER_QUEUE_MAX_SIZE": "100000",
            "USHER_DISPATCH_CONCURRENCY": "16",
        },
        pool_env={"USHER_POOL_SLOT_LEASE_SECONDS": "3"},
    )
    rng = random.Random(3)
    with LocalStack(config) as stack:
        client = AsyncUsherClient(
            stack.scheduler_address,
            stack.notifier_address,
            token="alice-token",
            retry=RetryPolicy(max_total_wait=120.0, max_attempts=200, max_backoff=1.0),
        )
        accepted: list[str] = []
        events: dict[str, list[str]] = {}
        recoveries: dict[str, list[float]] = defaultdict(list)
        done_submitting = asyncio.Event()

        async def submit_all() -> None:
            for i in range(total):
                submission = await client.submit(MODEL, f"chaos {i}")
                accepted.append(submission.request.id)
                if i % 20 == 0:
                    watchers.append(asyncio.create_task(watch(submission.request.id)))
                await asyncio.sleep(1 / per_second)
            done_submitting.set()

        async def watch(request_id: str) -> None:
            seen = events.setdefault(request_id, [])
            async for update in client.watch(request_id):
                if update.event_id:
                    seen.append(update.event_id)

        async def outage(victim: str) -> None:
            started = time.monotonic()
            if victim == "scheduler":
                stack.schedulers[0].kill()
                await asyncio.to_thread(stack.start_scheduler, 0)
            elif victim == "pool":
                assert stack.pool is not None
                stack.pool.kill()
                await asyncio.to_thread(stack.start_pool)
            elif victim == "notifier":
                stack.notifiers[0].kill()
                await asyncio.to_thread(stack.start_notifier, 0)
            elif victim == "redis":
                assert stack.redis is not None
                stack.redis.kill()
                await asyncio.to_thread(stack.redis.start)
            else:
                # A model server dies for a couple of seconds, then comes back.
                index = rng.randrange(len(stack.model_servers))
                stack.model_servers[index].kill()
                await asyncio.sleep(2.0)
                await asyncio.to_thread(stack.restart_model_server, index)
            # Recovered when a client call goes through again.
            while True:
                try:
                    await client.get(accepted[-1])
                    break
                except UsherError:
                    await asyncio.sleep(0.05)
            recoveries[victim].append(time.monotonic() - started)

        async def chaos() -> None:
            # Every kind of victim in turn, in a shuffled order, at random intervals.
            order = rng.sample(VICTIMS, len(VICTIMS))
            for n in itertools.count():
                await asyncio.sleep(rng.uniform(1.5, 3.5))
                if done_submitting.is_set():
                    return
                if accepted:
                    await outage(order[n % len(order)])

        watchers: list[asyncio.Task[None]] = []
        began = time.monotonic()
        await asyncio.gather(submit_all(), chaos())
        finished: dict[str, str] = {}
        deadline = time.monotonic() + 180
        while len(finished) < len(accepted) and time.monotonic() < deadline:
            for request_id in accepted:
                if request_id not in finished:
                    request = await client.get(request_id)
                    if request.state.name in ("COMPLETED", "FAILED", "CANCELLED", "EXPIRED"):
                        finished[request_id] = request.state.name
            await asyncio.sleep(0.5)
        await asyncio.wait_for(asyncio.gather(*watchers, return_exceptions=True), 60)
        await client.close()
    outcomes: dict[str, int] = defaultdict(int)
    for state in finished.values():
        outcomes[state] += 1
    duplicates = sum(len(ids) - len(set(ids)) for ids in events.values())
    all_recoveries = [r for rs in recoveries.values() for r in rs]
    emit(
        "chaos.kill_restart",
        requests_accepted=len(accepted),
        requests_finished=len(finished),
        lost=len(accepted) - len(finished),
        outcomes=dict(outcomes),
        watched_requests=len(events),
        duplicate_events_delivered=duplicates,
        kills={victim: len(rs) for victim, rs in recoveries.items()},
        recovery_p50_s=percentile(all_recoveries, 50) if all_recoveries else None,
        recovery_max_s=max(all_recoveries) if all_recoveries else None,
        recovery_max_by_victim_s={v: round(max(rs), 2) for v, rs in recoveries.items()},
        seconds=time.monotonic() - began,
        note="a model server stays down 2 s before it returns; the others restart at once",
    )
