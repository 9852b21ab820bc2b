"""Per-tenant rate limits (requests and tokens per minute), concurrency quotas and priority
caps, enforced atomically in Redis (lua/admit.lua) before a request is queued."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from importlib import resources
from typing import cast

import redis.asyncio as aioredis

from usher import keys
from usher.keys import TenantKeys

__all__ = ["Admission", "Limits", "Quotas"]

CACHE_SECONDS = 1.0
#: A live-request entry lapses this long after its queue deadline, in case a removal was
#: missed (the request ended through the reaper or a drain): a generous bound on run time.
LIVE_GRACE_MS = 15 * 60_000


@dataclass(frozen=True, slots=True)
class Limits:
    """0 = unlimited; priority_cap 0 = no cap (else the most urgent class allowed, 1-5)."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    max_concurrent: int = 0
    priority_cap: int = 0

    @property
    def unlimited(self) -> bool:
        return not (self.requests_per_minute or self.tokens_per_minute or self.max_concurrent)

    def capped(self, priority_class: int) -> int:
        """The class a request actually gets (a larger number is less urgent)."""
        return max(priority_class, self.priority_cap) if self.priority_cap else priority_class


@dataclass(frozen=True, slots=True)
class Admission:
    admitted: bool
    retry_after_seconds: float = 0.0
    reason: str = ""


class Quotas:
    def __init__(self, client: aioredis.Redis, defaults: Limits | None = None) -> None:
        self.redis = client
        self.defaults = defaults or Limits()
        script = (resources.files("services.scheduler") / "lua" / "admit.lua").read_text()
        self._admit = client.register_script(script)
        self._cache: dict[str, tuple[float, Limits]] = {}

    async def limits_for(self, organization: str, user: str) -> Limits:
        tenant = f"{organization}/{user}"
        cached = self._cache.get(tenant)
        now = time.monotonic()
        if cached and cached[0] > now:
            return cached[1]
        own, org = cast(
            list[bytes | None],
            await self.redis.hmget(keys.TENANT_LIMITS, [tenant, f"{organization}/"]),
        )
        raw = own or org
        limits = Limits(**json.loads(raw)) if raw else self.defaults
        self._cache[tenant] = (now + CACHE_SECONDS, limits)
        return limits

    async def set_limits(self, organization: str, user: str, limits: Limits) -> None:
        await self.redis.hset(
            keys.TENANT_LIMITS, f"{organization}/{user}", json.dumps(asdict(limits))
        )
        self._cache.clear()

    async def admit(
        self, tenant: str, request_id: str, cost: float, limits: Limits, live_until_ms: int
    ) -> Admission:
        if limits.unlimited:
            return Admission(True)
        tk = TenantKeys(tenant)
        retry_ms, reason = await self._admit(
            keys=[tk.buckets, tk.live],
            args=[
                int(time.time() * 1000),
                limits.requests_per_minute,
                limits.tokens_per_minute,
                repr(cost),
                limits.max_concurrent,
                request_id,
                live_until_ms + LIVE_GRACE_MS,
            ],
        )
        if int(retry_ms) == 0:
            return Admission(True)
        return Admission(False, int(retry_ms) / 1000, reason.decode())

    async def release(self, tenant: str, request_id: str, refund_cost: float | None = None) -> None:
        """The request is no longer live (or was never queued: give back what it was charged)."""
        tk = TenantKeys(tenant)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(tk.live, request_id)
            if refund_cost is not None:
                pipe.hincrbyfloat(tk.buckets, "requests", 1)
                pipe.hincrbyfloat(tk.buckets, "tokens", refund_cost)
            await pipe.execute()
