"""Settles coalesced: the settles due together share one script call per tenant, and each
request's charge comes out as if settled alone."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from services.scheduler.quotas import Footprint, Limits, Quotas, StorageCharge
from usher import keys
from usher.keys import TenantKeys


async def test_settles_together_charge_each_request_as_alone(redis_client: aioredis.Redis) -> None:
    quotas = Quotas(redis_client)
    now = int(time.time() * 1000)
    limits = Limits(max_concurrent=10)
    tenants = [keys.tenant_id("acme", user) for user in ("alice", "bob")]
    for tenant in tenants:
        for i in range(4):
            admitted = await quotas.admit(
                tenant, f"r{i}", 1.0, limits, now + 60_000, StorageCharge(1000, 10**9, now + 10**6)
            )
            assert admitted.admitted
        assert await quotas.stored_bytes(tenant) == 4000
    # Four settles per tenant at once: charged at their new sizes, one dropped, none live.
    settles = [
        quotas.settle(tenant, f"r{i}", Footprint(100 * (i + 1) if i < 3 else 0, now + 5_000))
        for tenant in tenants
        for i in range(4)
    ]
    await asyncio.gather(*settles)
    for tenant in tenants:
        tk = TenantKeys(tenant)
        assert await quotas.stored_bytes(tenant) == 100 + 200 + 300
        assert await redis_client.zcard(tk.live) == 0
        assert await redis_client.hget(tk.stored_bytes, "r3") is None
        assert await redis_client.zscore(tk.stored, "r0") == now + 5_000
        assert int(await redis_client.hget(tk.stored_bytes, "next") or 0) <= now + 5_000
    # A settle of a request charged nothing changes nothing.
    await quotas.settle(tenants[0], "unknown", Footprint(500, now + 5_000))
    assert await quotas.stored_bytes(tenants[0]) == 600
