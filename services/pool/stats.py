"""Fleet statistics per model, kept in Redis so every Pool replica reports the same figures."""

from __future__ import annotations

from typing import cast

import redis.asyncio as aioredis

from services.pool.registry import Registry
from services.pool.slots import SlotStore
from services.pool.upstream import Done
from usher import keys
from usher.keys import ModelKeys
from usher.smoothing import EWMA_ALPHA
from usher.structs import duration_from_seconds
from usher.v1 import pool_pb2

__all__ = ["PoolStats"]

_UPDATE = """
-- KEYS[1] model stats hash; ARGV: 1 processing s, 2 tokens/s, 3 alpha
redis.call('HINCRBY', KEYS[1], 'processed', 1)
local alpha = tonumber(ARGV[3])
for i, name in ipairs({'processing_s', 'tokens_per_s'}) do
  local sample = tonumber(ARGV[i])
  if sample > 0 then
    local old = tonumber(redis.call('HGET', KEYS[1], name))
    redis.call('HSET', KEYS[1], name, tostring(old and (old + alpha * (sample - old)) or sample))
  end
end
"""


def _float(raw: dict[bytes, bytes], name: str) -> float:
    value = raw.get(name.encode())
    return float(value) if value else 0.0


class PoolStats:
    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client
        self._update = client.register_script(_UPDATE)

    async def record_done(self, model: str, instance: str, done: Done) -> None:
        tps = done.completion_tokens / done.eval_seconds if done.eval_seconds > 0 else 0.0
        await self._update(
            keys=[keys.pool_model_stats(model)],
            args=[repr(done.total_seconds), repr(tps), repr(EWMA_ALPHA)],
        )
        if done.load_seconds > 0.05:
            await self.redis.hincrby(keys.pool_model_stats(model), "loads", 1)

    async def record_failure(self, model: str) -> None:
        await self.redis.hincrby(keys.pool_model_stats(model), "failed", 1)

    async def model_stats(
        self, models: list[str], registry: Registry, slots: SlotStore
    ) -> list[pool_pb2.ModelStats]:
        if not models:
            known = cast(set[bytes], await self.redis.smembers(keys.MODELS))
            served = {m for s in registry.instances.values() for m in s.available}
            models = sorted({m.decode() for m in known} | served)
        instances = list(registry.instances.values())
        out = []
        for model in models:
            mk = ModelKeys(model)
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(keys.pool_model_stats(model))
                pipe.zcard(mk.queue)
                pipe.hgetall(mk.stats)
                pool_raw, queued, scheduler_raw = await pipe.execute()
            usage = await slots.usage([s.id for s in instances], model)
            serving = [
                s for s in instances if s.healthy and s.serves(model) and not s.spec.external
            ]
            stats = pool_pb2.ModelStats(
                model=model,
                active=sum(u.model_active for u in usage.values()),
                queued=int(queued),
                capacity=sum(s.spec.parallel for s in serving if not s.draining),
                processed=int(_float(pool_raw, "processed")),
                failed=int(_float(pool_raw, "failed")),
                rejected=int(_float(scheduler_raw, "rejected")),
                tokens_per_second=_float(pool_raw, "tokens_per_s"),
                loaded_on=sorted(s.id for s in instances if model in s.loaded),
                memory_bytes=max(
                    (s.loaded[model].size_bytes for s in instances if model in s.loaded), default=0
                ),
                loads=int(_float(pool_raw, "loads")),
            )
            stats.avg_processing.CopyFrom(duration_from_seconds(_float(pool_raw, "processing_s")))
            stats.avg_wait.CopyFrom(duration_from_seconds(_float(scheduler_raw, "wait_ms") / 1000))
            out.append(stats)
        return out
