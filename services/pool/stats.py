"""Fleet statistics per model, kept in Redis so every Pool replica reports the same figures."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
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

#: Samples wait this long at most before they are written, all in one script call: a call
#: per request would cost more Redis work than the request's own slot accounting.
FLUSH_SECONDS = 0.5

_UPDATE = """
-- KEYS[1] model stats hash; ARGV: 1 alpha, 2 loads, 3.. samples as (processing s, tokens/s)
-- pairs, oldest first, each folded into the moving averages in turn (0 = no sample).
local alpha = tonumber(ARGV[1])
local names = {'processing_s', 'tokens_per_s'}
local values = redis.call('HMGET', KEYS[1], names[1], names[2])
local samples = (#ARGV - 2) / 2
for i = 0, samples - 1 do
  for j = 1, 2 do
    local sample = tonumber(ARGV[3 + 2 * i + j - 1])
    if sample > 0 then
      local old = tonumber(values[j])
      values[j] = old and (old + alpha * (sample - old)) or sample
    end
  end
end
local fields = {}
for j = 1, 2 do
  if values[j] then
    fields[#fields + 1] = names[j]
    fields[#fields + 1] = tostring(values[j])
  end
end
if #fields > 0 then redis.call('HSET', KEYS[1], unpack(fields)) end
redis.call('HINCRBY', KEYS[1], 'processed', samples)
if tonumber(ARGV[2]) > 0 then redis.call('HINCRBY', KEYS[1], 'loads', ARGV[2]) end
"""


@dataclass
class _Pending:
    """Samples of one model not yet written: (processing s, tokens/s) pairs, and loads."""

    samples: list[tuple[float, float]] = field(default_factory=list)
    loads: int = 0


def _float(raw: dict[bytes, bytes], name: str) -> float:
    value = raw.get(name.encode())
    return float(value) if value else 0.0


class PoolStats:
    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client
        self._update = client.register_script(_UPDATE)
        self._pending: dict[str, _Pending] = {}
        self._flusher: asyncio.Task[None] | None = None

    def record_done(self, model: str, done: Done) -> None:
        """Count a completed call; written within FLUSH_SECONDS with the others of the
        moment (GetModelStats on this replica writes what is pending first)."""
        tps = done.completion_tokens / done.eval_seconds if done.eval_seconds > 0 else 0.0
        pending = self._pending.setdefault(model, _Pending())
        pending.samples.append((done.total_seconds, tps))
        if done.load_seconds > 0.05:
            pending.loads += 1
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(FLUSH_SECONDS)
        await self.flush()

    async def flush(self) -> None:
        """Write the pending samples, one script call per model."""
        pending, self._pending = self._pending, {}
        for model, batch in pending.items():
            args: list[float | int | str] = [repr(EWMA_ALPHA), batch.loads]
            for seconds, tps in batch.samples:
                args += [repr(seconds), repr(tps)]
            await self._update(keys=[keys.pool_model_stats(model)], args=args)

    async def aclose(self) -> None:
        """Write what is pending (on shutdown: nothing counted is lost)."""
        if self._flusher is not None:
            self._flusher.cancel()
        await self.flush()

    async def record_failure(self, model: str) -> None:
        await self.redis.hincrby(keys.pool_model_stats(model), "failed", 1)

    async def model_stats(
        self, models: list[str], registry: Registry, slots: SlotStore
    ) -> list[pool_pb2.ModelStats]:
        await self.flush()
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
                pipe.hget(mk.fairness, "wait_ms")  # where complete.lua keeps it now
                pool_raw, queued, scheduler_raw, wait_ms = await pipe.execute()
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
            wait = float(wait_ms) if wait_ms is not None else _float(scheduler_raw, "wait_ms")
            stats.avg_wait.CopyFrom(duration_from_seconds(wait / 1000))
            out.append(stats)
        return out
