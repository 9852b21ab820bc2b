"""Per-tenant rate limits (requests and tokens per minute), concurrency quotas, priority
caps and a bound on stored bytes, enforced atomically in Redis (lua/admit.lua) before a
request is queued; lua/settle.lua frees a slot and re-charges storage at what a request
really holds once it ends (its prompt dropped, its result kept for the result TTL)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any, cast

import redis.asyncio as aioredis

from usher import keys
from usher.background import Background
from usher.batching import Coalescer
from usher.keys import TenantKeys
from usher.scripts import ScriptCall, run_script_calls

__all__ = ["Admission", "Footprint", "Limits", "Quotas", "StorageCharge"]

CACHE_SECONDS = 1.0
#: Most settles sent in one round trip.
SETTLE_BATCH = 256
#: How long a settle nobody waits on (settle_soon) waits for others to go with it: a
#: storage charge is kept to within its data's lifetime (minutes), not milliseconds.
SETTLE_LINGER_SECONDS = 0.1
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
    #: Fallback policy of the tenant's requests that name none; 0 = the model's default.
    fallback_policy: int = 0

    @property
    def unlimited(self) -> bool:
        return not (self.requests_per_minute or self.tokens_per_minute or self.max_concurrent)

    def capped(self, priority_class: int) -> int:
        """The class a request actually gets (a larger number is less urgent)."""
        return max(priority_class, self.priority_cap) if self.priority_cap else priority_class


@dataclass(frozen=True, slots=True)
class StorageCharge:
    """What a new request will store, the tenant's bound (0 = none), and when the charge
    lapses if nothing settles it sooner (its queue timeout, run time and result TTL)."""

    bytes: int
    max_bytes: int
    lapses_ms: int


@dataclass(frozen=True, slots=True)
class Footprint:
    """What a request holds in Redis now (0 = nothing) and when that expires (ms; 0 = it
    does not expire yet: the request is live)."""

    bytes: int
    expires_ms: int = 0


@dataclass(frozen=True, slots=True)
class _Settle:
    """One request's settle: its charge now (bytes, -1 = none) and when it lapses (ms)."""

    tenant: str
    request_id: str
    size: int
    lapses_ms: int

    @classmethod
    def of(cls, tenant: str, request_id: str, footprint: Footprint) -> _Settle:
        if footprint.bytes > 0:
            return cls(tenant, request_id, footprint.bytes, footprint.expires_ms)
        return cls(tenant, request_id, -1, 0)


def _settle_keys(tk: TenantKeys) -> list[str]:
    return [tk.buckets, tk.live, tk.stored, tk.stored_bytes]


@dataclass(frozen=True, slots=True)
class Admission:
    admitted: bool
    retry_after_seconds: float = 0.0
    reason: str = ""


class Quotas:
    def __init__(self, client: aioredis.Redis, defaults: Limits | None = None) -> None:
        self.redis = client
        self.defaults = defaults or Limits()
        folder = resources.files("services.scheduler") / "lua"
        self._admit = client.register_script((folder / "admit.lua").read_text())
        self._settle_script = client.register_script((folder / "settle.lua").read_text())
        self._settles: Coalescer[_Settle, None] = Coalescer(self._settle_many, SETTLE_BATCH)
        self._lingering: Coalescer[_Settle, None] = Coalescer(
            self._settle_many, SETTLE_BATCH, linger=SETTLE_LINGER_SECONDS
        )
        #: Settles sent by settle_soon and not yet answered (flush waits for them).
        self._unanswered = Background()
        self._cache: dict[str, tuple[float, Limits]] = {}

    def stale(self, organization: str, user: str) -> bool:
        """Whether limits_for would read Redis now."""
        cached = self._cache.get(keys.tenant_id(organization, user))
        return cached is None or cached[0] <= time.monotonic()

    async def limits_for(self, organization: str, user: str) -> Limits:
        tenant = keys.tenant_id(organization, user)
        cached = self._cache.get(tenant)
        now = time.monotonic()
        if cached and cached[0] > now:
            return cached[1]
        own, org = cast(
            list[bytes | None],
            await self.redis.hmget(keys.TENANT_LIMITS, [tenant, keys.tenant_id(organization, "")]),
        )
        raw = own or org
        limits = Limits(**json.loads(raw)) if raw else self.defaults
        self._cache[tenant] = (now + CACHE_SECONDS, limits)
        return limits

    def _may_hold_live(self, tenant: str) -> bool:
        """Whether the tenant's requests may have entries in its live set: unless its limits,
        read within CACHE_SECONDS, have no concurrency quota (then admit.lua added none and
        a settle needs no ZREM). An entry added under a quota that was lifted since stays
        until it lapses (LIVE_GRACE_MS past its deadline), as a missed removal does."""
        cached = self._cache.get(tenant)
        return cached is None or cached[0] <= time.monotonic() or cached[1].max_concurrent > 0

    async def set_limits(self, organization: str, user: str, limits: Limits) -> None:
        await self.redis.hset(
            keys.TENANT_LIMITS, keys.tenant_id(organization, user), json.dumps(asdict(limits))
        )
        self._cache.clear()

    async def check(self, call: ScriptCall) -> Admission:
        """Send an ``admission`` on its own and read its verdict."""
        return self.verdict((await run_script_calls(self.redis, [call]))[0])

    def admission(
        self,
        tenant: str,
        request_id: str,
        cost: float,
        limits: Limits,
        live_until_ms: int,
        storage: StorageCharge,
    ) -> ScriptCall | None:
        """The check and charge of a new request's rate limits and concurrency (when its
        tenant has limits) and of the bytes it will store (always, unless the bound is 0):
        admit.lua's call, sent by the caller or by ``check`` (None: nothing to check), its
        reply read with ``verdict``. A key added after its own (the request's
        ``admission_refused`` marker, ``QueueStore.submit``) is set on a refusal, and an
        enqueue sent right after in the same round trip then queues nothing."""
        if limits.unlimited and storage.max_bytes <= 0:
            return None
        tk = TenantKeys(tenant)
        return ScriptCall(
            self._admit,
            keys=[tk.buckets, tk.live, tk.stored, tk.stored_bytes],
            args=[
                int(time.time() * 1000),
                limits.requests_per_minute,
                limits.tokens_per_minute,
                repr(cost),
                limits.max_concurrent,
                request_id,
                live_until_ms + LIVE_GRACE_MS,
                storage.bytes,
                storage.max_bytes,
                storage.lapses_ms,
            ],
        )

    @staticmethod
    def verdict(reply: object) -> Admission:
        """What the admission script answered (an error raised)."""
        if isinstance(reply, BaseException):
            raise reply
        retry_ms, reason = cast("list[Any]", reply)
        if int(retry_ms) == 0:
            return Admission(True)
        return Admission(False, int(retry_ms) / 1000, bytes(reason).decode())

    async def release(self, tenant: str, request_id: str, refund_cost: float | None = None) -> None:
        """The request was never stored (it joined another, or the queue was full): free its
        slot, drop its storage charge, and give back the rate it was charged (when
        ``refund_cost`` is given: the caller has rate limits)."""
        tk = TenantKeys(tenant)
        await self._settle_script(
            keys=_settle_keys(tk),
            args=[
                int(time.time() * 1000),
                0 if refund_cost is None else 1,
                0 if refund_cost is None else repr(refund_cost),
                1 if self._may_hold_live(tenant) else 0,
                request_id,
                -1,
                0,
            ],
        )

    async def settle(self, tenant: str, request_id: str, footprint: Footprint) -> None:
        """The request is no longer live (or its data changed): free its concurrency slot
        and charge its storage at what it holds now, until its data expires. Settles due
        while one is under way go together: one script call per tenant among them, in one
        round trip."""
        await self._settles.submit(_Settle.of(tenant, request_id, footprint))

    async def settle_soon(self, tenant: str, request_id: str, footprint: Footprint) -> None:
        """As ``settle``, without waiting where nothing waits on it: a tenant with no
        concurrency quota has no slot to free, only its storage to charge again, which goes
        with the other settles of the next SETTLE_LINGER_SECONDS in one script call. Lost
        with its process (flush sends them on a stop), the charge stays the admission's,
        which lapses later: an over-charge for a while, never an under-charge."""
        if self._may_hold_live(tenant):
            await self.settle(tenant, request_id, footprint)
            return
        self._unanswered.hold(self._lingering.submit(_Settle.of(tenant, request_id, footprint)))

    async def flush(self) -> None:
        """Wait for the settles settle_soon sent (a stopping Scheduler's last ones)."""
        await self._unanswered.drain()

    async def _settle_many(self, settles: list[_Settle]) -> list[BaseException | None]:
        by_tenant: dict[str, list[_Settle]] = {}
        for entry in settles:
            by_tenant.setdefault(entry.tenant, []).append(entry)
        now = int(time.time() * 1000)
        calls = []
        for tenant, entries in by_tenant.items():
            args: list[str | int] = [now, 0, 0, 1 if self._may_hold_live(tenant) else 0]
            for entry in entries:
                args += [entry.request_id, entry.size, entry.lapses_ms]
            calls.append(ScriptCall(self._settle_script, _settle_keys(TenantKeys(tenant)), args))
        for reply in await run_script_calls(self.redis, calls):
            if isinstance(reply, BaseException):
                raise reply
        return [None] * len(settles)

    async def stored_bytes(self, tenant: str) -> int:
        """Bytes charged to ``tenant`` now (for operators and tests)."""
        raw = await self.redis.hget(TenantKeys(tenant).stored_bytes, "total")
        return int(raw or 0)
