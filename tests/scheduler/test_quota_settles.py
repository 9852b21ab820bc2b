"""Settles coalesced: the settles due together share one script call per tenant, and each
request's charge comes out as if settled alone."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as aioredis

from services.scheduler.quotas import Admission, Footprint, Limits, Quotas, StorageCharge
from usher import keys
from usher.keys import TenantKeys


async def admit(quotas: Quotas, *args: Any) -> Admission:
    """A new request's admission (``Quotas.admission``'s arguments) sent on its own, as a
    Submit on a Cluster sends it."""
    call = quotas.admission(*args)
    assert call is not None
    return await quotas.check(call)


async def test_settles_together_charge_each_request_as_alone(redis_client: aioredis.Redis) -> None:
    quotas = Quotas(redis_client)
    now = int(time.time() * 1000)
    limits = Limits(max_concurrent=10)
    tenants = [keys.tenant_id("acme", user) for user in ("alice", "bob")]
    for tenant in tenants:
        for i in range(4):
            admitted = await admit(
                quotas,
                tenant,
                f"r{i}",
                1.0,
                limits,
                now + 60_000,
                StorageCharge(1000, 10**9, now + 10**6),
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


async def test_a_charge_lapsing_a_little_after_its_data_keeps_its_lapse(
    redis_client: aioredis.Redis,
) -> None:
    """A settle leaves the admission's lapse (no ZADD) when it is later than the data's by
    no more than a sixteenth of the data's time left; a lapse further off, or earlier than
    the data's, is moved, and a dropped charge leaves nothing behind."""
    quotas = Quotas(redis_client)
    tenant = keys.tenant_id("acme", "carol")
    tk = TenantKeys(tenant)
    now = int(time.time() * 1000)
    day, admitted_lapse = 86_400_000, now + 86_400_000 + 1_200_000
    for request_id in ("near", "far", "late", "gone"):
        lapse = now + 10 * day if request_id == "far" else admitted_lapse
        charge = StorageCharge(1000, 10**9, lapse)
        assert (await admit(quotas, tenant, request_id, 1.0, Limits(), now, charge)).admitted
    await quotas.settle(tenant, "near", Footprint(300, now + day))
    await quotas.settle(tenant, "far", Footprint(300, now + day))
    await quotas.settle(tenant, "late", Footprint(300, admitted_lapse + 1000))
    await quotas.settle(tenant, "gone", Footprint(0))
    assert await redis_client.zscore(tk.stored, "near") == admitted_lapse
    assert await redis_client.zscore(tk.stored, "far") == now + day
    assert await redis_client.zscore(tk.stored, "late") == admitted_lapse + 1000
    assert int(await redis_client.hget(tk.stored_bytes, "lapse:late") or 0) == admitted_lapse + 1000
    assert await redis_client.hget(tk.stored_bytes, "lapse:gone") is None
    assert await quotas.stored_bytes(tenant) == 900


async def test_an_admission_sent_again_charges_once(redis_client: aioredis.Redis) -> None:
    """A pipeline sent again (Redis lost its scripts) or retried repeats the admission: the
    request it already charged is admitted again without a second charge."""
    quotas = Quotas(redis_client)
    tenant = keys.tenant_id("acme", "dave")
    now = int(time.time() * 1000)
    limits = Limits(requests_per_minute=2, max_concurrent=1)
    charge = StorageCharge(1000, 10**9, now + 10**6)
    for _ in range(3):
        assert (await admit(quotas, tenant, "r1", 1.0, limits, now + 60_000, charge)).admitted
    assert await quotas.stored_bytes(tenant) == 1000
    refused = await admit(quotas, tenant, "r2", 1.0, limits, now + 60_000, charge)
    assert (refused.admitted, refused.reason) == (False, "concurrency")


async def test_settles_nobody_waits_on_go_together_after_a_linger(
    redis_client: aioredis.Redis,
) -> None:
    """A tenant with no concurrency quota has no slot to free: its dispatcher's settles go
    on without it, together, one script call for those of the linger; flush sends them.
    One with a concurrency quota is settled before the caller goes on."""
    quotas = Quotas(redis_client)
    now = int(time.time() * 1000)
    await quotas.limits_for("acme", "alice")  # no quota (the defaults), as a Submit reads
    tenant = keys.tenant_id("acme", "alice")
    for i in range(3):
        admitted = await admit(
            quotas,
            tenant,
            f"r{i}",
            1.0,
            Limits(),
            now + 60_000,
            StorageCharge(1000, 10**9, now + 10**6),
        )
        assert admitted.admitted
    before = int((await redis_client.info("commandstats"))["cmdstat_evalsha"]["calls"])
    for i in range(3):
        await quotas.settle_soon(tenant, f"r{i}", Footprint(100, now + 5_000))
    assert await quotas.stored_bytes(tenant) == 3000  # not yet: the caller went on
    await quotas.flush()
    assert await quotas.stored_bytes(tenant) == 300
    after = int((await redis_client.info("commandstats"))["cmdstat_evalsha"]["calls"])
    assert after - before == 1
    # With a concurrency quota its slot is freed before the caller goes on.
    quotas.defaults = Limits(max_concurrent=5)
    await quotas.limits_for("acme", "bob")
    bob = keys.tenant_id("acme", "bob")
    limits = Limits(max_concurrent=5)
    charge = StorageCharge(1000, 10**9, now + 10**6)
    assert (await admit(quotas, bob, "b0", 1.0, limits, now + 60_000, charge)).admitted
    assert await redis_client.zcard(TenantKeys(bob).live) == 1
    await quotas.settle_soon(bob, "b0", Footprint(100, now + 5_000))
    assert await redis_client.zcard(TenantKeys(bob).live) == 0
    assert await quotas.stored_bytes(bob) == 100
