"""The placement pass: load models that have queued demand, unload idle ones.

The decisions are placement.plan's (pure); this module gathers its inputs (queue lengths
from the scheduler's keys, what each instance has loaded) and carries them out. One replica
at a time runs a pass, under a short Redis lock, so two replicas never load the same model
twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from typing import cast

from services.pool.placement import Action, plan
from services.pool.registry import Registry
from services.pool.slots import SlotStore
from services.pool.upstream import UpstreamError
from usher import keys
from usher.keys import ModelKeys
from usher.logs import get_logger

__all__ = ["place_forever", "place_once"]

log = get_logger(__name__)


async def demand(registry: Registry) -> dict[str, int]:
    """Queued requests per model, read from the scheduler's queues."""
    models = sorted(
        m.decode() for m in cast(set[bytes], await registry.redis.smembers(keys.MODELS))
    )
    if not models:
        return {}
    async with registry.redis.pipeline(transaction=False) as pipe:
        for model in models:
            pipe.zcard(ModelKeys(model).queue)
        lengths = cast(list[int], await pipe.execute())
    return {m: int(n) for m, n in zip(models, lengths, strict=True) if n}


async def running_per_model(registry: Registry, slots: SlotStore) -> dict[str, dict[str, int]]:
    """instance → model → requests running now, for every loaded model."""
    loaded = {model for state in registry.instances.values() for model in state.loaded}
    ids = list(registry.instances)
    out: dict[str, dict[str, int]] = {i: {} for i in ids}
    for model in loaded:
        for instance, usage in (await slots.usage(ids, model)).items():
            out[instance][model] = usage.model_active
    return out


async def place_once(registry: Registry, slots: SlotStore) -> list[Action]:
    token = secrets.token_hex(8)
    if not await registry.redis.set(keys.POOL_PLACEMENT_LOCK, token, nx=True, px=30_000):
        return []
    try:
        states = [s for s in registry.instances.values() if s.spec.placed]
        sizes: dict[str, int] = {}
        for state in states:
            sizes.update(state.available)
        running = await running_per_model(registry, slots)
        actions = plan(
            await demand(registry),
            sizes,
            [s.view(running.get(s.id)) for s in states],
            time.time(),
            idle_unload_seconds=registry.settings.idle_unload_seconds,
            scale_out_queue_length=registry.settings.scale_out_queue_length,
        )
        for action in actions:
            target = registry.instances.get(action.instance)
            if target is None:
                continue
            log.info(
                "placement",
                action=action.kind,
                instance=action.instance,
                model=action.model,
                reason=action.reason,
            )
            try:
                if action.kind == "load":
                    await target.upstream.load(
                        action.model,
                        keep_alive_seconds=registry.settings.keep_alive_for(
                            target.spec, action.model, target.held_for(action.model, time.time())
                        ),
                    )
                    target.last_used[action.model] = time.time()
                else:
                    await target.upstream.unload(action.model)
            except UpstreamError as error:
                log.warning(
                    "placement failed",
                    instance=action.instance,
                    model=action.model,
                    error=str(error),
                )
            await registry.check(target)
        return actions
    finally:
        if await registry.redis.get(keys.POOL_PLACEMENT_LOCK) == token.encode():
            await registry.redis.delete(keys.POOL_PLACEMENT_LOCK)


async def place_forever(
    registry: Registry, slots: SlotStore, interval_seconds: float, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        try:
            await place_once(registry, slots)
        except Exception as exc:  # Redis or an instance away: try again next pass.
            log.warning("placement pass failed", error=str(exc))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_seconds)
