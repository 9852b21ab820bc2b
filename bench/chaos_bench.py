"""Chaos: a steady stream of requests while the Scheduler, the Pool, the Notifier and Redis
(AOF, appendfsync always) are SIGKILLed and restarted at random. Reports accepted vs
finished (must be equal: nothing lost), duplicate events delivered to watchers (must be 0)
and how long each outage lasted for clients (recovery time); bench/results/chaos.png shows
completions per second with each kill marked."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from bench import plots
from bench.stats import percentile
from clients.aio import AsyncUsherClient
from clients.errors import UsherError
from clients.retry import RetryPolicy
from usher.testing.stack import LocalStack, StackConfig

MODEL = "llama3.2:1b"
VICTIMS = ("scheduler", "pool", "notifier", "redis", "model server")


@dataclass(frozen=True)
class Kill:
    victim: str
    #: Seconds since the run began.
    at: float
    recovery: float


async def run(total: int = 1000, per_second: float = 40.0) -> dict[str, Any]:
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
        accepted_at: list[float] = []
        events: dict[str, list[str]] = {}
        kills: list[Kill] = []
        done_submitting = asyncio.Event()

        async def submit_all() -> None:
            for i in range(total):
                submission = await client.submit(MODEL, f"chaos {i}")
                accepted.append(submission.request.id)
                accepted_at.append(time.monotonic() - began)
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
            kills.append(Kill(victim, started - began, time.monotonic() - started))

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
        began_wall = time.time()
        await asyncio.gather(submit_all(), chaos())
        finished: dict[str, str] = {}
        finished_at: list[float] = []  # seconds since began, of the completed ones
        deadline = time.monotonic() + 180
        while len(finished) < len(accepted) and time.monotonic() < deadline:
            for request_id in accepted:
                if request_id not in finished:
                    request = await client.get(request_id)
                    if request.state.name in ("COMPLETED", "FAILED", "CANCELLED", "EXPIRED"):
                        finished[request_id] = request.state.name
                        if request.state.name == "COMPLETED" and request.finished_at:
                            finished_at.append(request.finished_at.timestamp() - began_wall)
            await asyncio.sleep(0.5)
        await asyncio.wait_for(asyncio.gather(*watchers, return_exceptions=True), 60)
        await client.close()
        seconds = time.monotonic() - began
    outcomes = Counter(finished.values())
    duplicates = sum(len(ids) - len(set(ids)) for ids in events.values())
    by_victim: dict[str, list[float]] = defaultdict(list)
    for kill in kills:
        by_victim[kill.victim].append(kill.recovery)
    recoveries = [kill.recovery for kill in kills]
    saved: list[str] = []
    _plot(accepted_at, finished_at, kills, saved)
    return {
        "requests_accepted": len(accepted),
        "requests_completed": outcomes["COMPLETED"],
        "all_accepted_completed": outcomes["COMPLETED"] == len(accepted),
        "lost": len(accepted) - len(finished),
        "outcomes": dict(outcomes),
        "watched_requests": len(events),
        "duplicate_events_delivered": duplicates,
        "kills": [{"victim": k.victim, "at_s": k.at, "recovery_s": k.recovery} for k in kills],
        "recovery_by_victim_s": {
            victim: {"kills": len(rs), "p50": percentile(rs, 50), "max": max(rs)}
            for victim, rs in sorted(by_victim.items())
        },
        "recovery_p50_s": percentile(recoveries, 50) if recoveries else None,
        "recovery_max_s": max(recoveries) if recoveries else None,
        "run_seconds": seconds,
        "note": "recovery = from the kill until a client call goes through again; a model "
        "server stays down 2 s before it returns, the others restart at once; duplicates "
        "counted over the watched requests (every 20th)",
        "plots": saved,
    }


def _plot(
    accepted_at: list[float], finished_at: list[float], kills: list[Kill], saved: list[str]
) -> None:
    """Requests accepted and completed per second, each kill marked by its victim."""
    end = math.ceil(max([*accepted_at, *finished_at, 1.0]))
    seconds = list(range(end + 1))

    def per_second(times: list[float]) -> list[int]:
        counts = Counter(int(t) for t in times if t >= 0)
        return [counts[s] for s in seconds]

    colors = dict(
        zip(VICTIMS, ("tab:red", "tab:purple", "tab:orange", "tab:brown", "tab:olive"), strict=True)
    )
    with plots.figure(
        "chaos",
        size=(15, 5),
        title="Chaos: completions per second while services are SIGKILLed and restarted",
        saved=saved,
    ) as (axis,):
        axis.bar(seconds, per_second(finished_at), 1.0, align="edge", alpha=0.6, label="completed")
        axis.step(
            seconds,
            per_second(accepted_at),
            where="post",
            color="black",
            linewidth=1,
            label="accepted",
        )
        # Head room above the bars for the victims' names.
        top = axis.get_ylim()[1] * 1.35
        axis.set_ylim(0, top)
        for kill in kills:
            color = colors.get(kill.victim, "tab:gray")
            axis.axvline(kill.at, color=color, linestyle="--", linewidth=1.2)
            axis.axvspan(kill.at, kill.at + kill.recovery, color=color, alpha=0.15)
            axis.text(
                kill.at,
                top * 0.98,
                f"{kill.victim} ",
                rotation=90,
                va="top",
                ha="right",
                fontsize=8,
                color=color,
            )
        axis.set_xlabel("seconds since the run began")
        axis.set_ylabel("requests per second")
        axis.set_xlim(0, end)
        axis.legend(loc="upper right", fontsize=8)
