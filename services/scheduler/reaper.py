"""The background loop every scheduler replica runs: requeue requests whose lease expired
(their dispatcher died) and end or hand off requests whose queue timeout passed.

Each pass is one atomic script per model, so several replicas reaping at once is safe.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

from services.scheduler.quotas import Quotas
from services.scheduler.store import Ended, QueueStore, ReapCounts
from usher import keys, metrics
from usher.logs import get_logger

__all__ = [
    "RETIRE_EVERY_SECONDS",
    "fall_back_when_unavailable",
    "reap_forever",
    "reap_once",
    "retire_departed",
    "settle_ended",
]

#: How often a replica looks for models that left the fleet.
RETIRE_EVERY_SECONDS = 30.0

log = get_logger(__name__)


async def settle_ended(store: QueueStore, quotas: Quotas | None, ended: Sequence[Ended]) -> None:
    """Requests a script ended no longer hold their tenant's concurrency slot, and their
    storage is charged at what they keep (metadata, result) until it expires."""
    if quotas is None:
        return
    for entry in ended:
        footprint = await store.footprint(entry.model, entry.request_id)
        await quotas.settle(entry.tenant, entry.request_id, footprint)


async def reap_once(
    store: QueueStore,
    quotas: Quotas | None = None,
    on_work: Callable[[str], None] | None = None,
) -> dict[str, ReapCounts]:
    """One pass over every model; ``on_work(model)`` when requests went back in line (the
    dispatchers wake for them at once)."""
    done: dict[str, ReapCounts] = {}
    for model in await store.models():
        counts = await store.reap(model)
        if on_work is not None and (counts.requeued or counts.back_in_line):
            on_work(model)
        await settle_ended(store, quotas, counts.ended)
        if counts.expired:
            metrics.REQUESTS.labels(model, "expired").inc(counts.expired)
        if counts.dead_lettered:
            metrics.REQUESTS.labels(model, "failed").inc(counts.dead_lettered)
        if (
            counts.requeued
            or counts.dead_lettered
            or counts.expired
            or counts.to_external
            or counts.dead_letters_deleted
            or counts.back_in_line
        ):
            log.info(
                "reaped",
                model=model,
                requeued=counts.requeued,
                dead_lettered=counts.dead_lettered,
                expired=counts.expired,
                to_external=counts.to_external,
                dead_letters_deleted=counts.dead_letters_deleted,
                back_in_line=counts.back_in_line,
            )
        done[model] = counts
    await fall_back_when_unavailable(store, list(done))
    return done


async def retire_departed(store: QueueStore) -> list[str]:
    """Models that left the fleet (no longer in the Pool's catalogue) and have no work:
    off the model set, so no loop walks them, their keys expiring after the result TTL and
    their metric series gone. Nothing happens before a Pool has published a catalogue."""
    served = await store.served_models(fresh=True)
    if not served:
        return []
    retired = []
    for model in await store.models():
        if model not in served and await store.retire(model, store.defaults.result_ttl_seconds):
            retired.append(model)
            for gauge in (metrics.QUEUE_DEPTH, metrics.QUEUE_RUNNING, metrics.QUEUE_LIMIT):
                with contextlib.suppress(KeyError):
                    gauge.remove(model)
    if retired:
        log.info("retired models that left the fleet", models=retired[:20], count=len(retired))
    return retired


async def fall_back_when_unavailable(store: QueueStore, models: list[str]) -> dict[str, int]:
    """When no local instance serves a model but an external provider is up, its queued
    requests that may leave the local fleet go to the external lane now ("Local models are
    temporarily unavailable. Switching to external provider.")."""
    async with store.redis.pipeline(transaction=False) as pipe:
        pipe.get(keys.POOL_EXTERNAL)
        pipe.hgetall(keys.POOL_CAPACITY)
        external, capacity = await pipe.execute()
    if not external:
        return {}
    moved: dict[str, int] = {}
    for model in models:
        if int(capacity.get(model.encode(), 0)) > 0:
            continue
        count = await store.hand_out_unavailable(model)
        if count:
            moved[model] = count
            log.info("no local instance: to the external provider", model=model, moved=count)
    return moved


async def refresh_gauges(store: QueueStore) -> None:
    """Queue depth, running and limit per model, for /metrics."""
    for model in await store.models():
        config = await store.config(model)
        metrics.QUEUE_DEPTH.labels(model).set(await store.queue_length(model))
        metrics.QUEUE_RUNNING.labels(model).set(await store.running_count(model))
        metrics.QUEUE_LIMIT.labels(model).set(config.max_queue_size)


async def reap_forever(
    store: QueueStore,
    interval_seconds: float,
    stop: asyncio.Event,
    quotas: Quotas | None = None,
    on_work: Callable[[str], None] | None = None,
) -> None:
    """Reap every ``interval_seconds`` until ``stop`` is set. Stopping by event rather than
    by cancelling lets a pass finish its script instead of abandoning a Redis call midway."""
    passes = 0
    retire_every = max(1, round(RETIRE_EVERY_SECONDS / interval_seconds))
    while not stop.is_set():
        try:
            await reap_once(store, quotas, on_work)
            passes += 1
            if passes % max(1, round(2 / interval_seconds)) == 0:  # gauges about every 2 s
                await refresh_gauges(store)
            if passes % retire_every == 0:
                await retire_departed(store)
        except Exception as exc:  # Redis away: keep trying, the work is still there.
            log.warning("reap failed", error=str(exc))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_seconds)
