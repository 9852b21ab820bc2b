"""Slot leases on Redis, shared by every Pool replica.

Ollama exposes no queue depth, so the Pool counts in-flight work itself: a request may run
on an instance only while it holds one of that instance's slots for its model. Slots are
leases that expire, so a replica that dies mid-request frees its slots within one lease.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, cast

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from usher.batching import Coalescer
from usher.keys import InstanceKeys
from usher.logs import get_logger
from usher.scripts import ScriptCall, run_script_calls

__all__ = ["SlotGrant", "SlotStore", "SlotUsage"]

log = get_logger(__name__)


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class SlotGrant:
    id: str
    instance: str
    model: str
    holder: str
    route: int


@dataclass(frozen=True, slots=True)
class SlotUsage:
    """Slots held now on one instance: for the model asked about, and in all."""

    model_active: int
    total_active: int


#: Slot ids are "<instance>/<token>.<route>.<model>.<holder>" (model and holder in unpadded
#: base64url): a slot carries what its grant says, so no Redis record of it is written or
#: read, and any replica can find its keys and check it is still held (one ZSCORE).
_ID_PARTS = 4


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _unb64(text: str) -> str:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()


def slot_id(instance: str, model: str, holder: str, route: int) -> str:
    return f"{instance}/{secrets.token_hex(8)}.{route}.{_b64(model)}.{_b64(holder)}"


def instance_of(slot_id: str) -> str:
    """The instance a slot id names (any replica can find the slot's keys)."""
    instance, sep, token = slot_id.rpartition("/")
    if not sep or not instance or not token:
        raise ValueError(f"{slot_id!r} is not a slot id")
    return instance


def grant_of(slot_id: str) -> SlotGrant | None:
    """The grant a slot id describes; None when the id is of an older form (a slot granted
    before an upgrade, to be reserved again). ValueError when it names no instance."""
    instance = instance_of(slot_id)
    parts = slot_id.rpartition("/")[2].split(".")
    if len(parts) != _ID_PARTS or not parts[1].isdigit():
        return None
    try:
        model, holder = _unb64(parts[2]), _unb64(parts[3])
    except (ValueError, UnicodeDecodeError):
        return None
    return SlotGrant(slot_id, instance, model, holder, int(parts[1]))


@dataclass(frozen=True, slots=True)
class _Call:
    """One slot script call waiting for the next pipeline."""

    script: str
    keys: list[str]
    args: list[Any]


#: Slot script calls sent in one pipeline at most.
BATCH = 256

#: Slot counts for routing are read again when older than this (off the request's path,
#: FleetRouter.watch_usage): a stale count only ranks instances (the reserve script
#: enforces the limits), and this replica's own grants and releases, and the counts each
#: reserve script returns, keep them current meanwhile.
USAGE_MAX_AGE_SECONDS = 0.25


class SlotStore:
    def __init__(self, client: aioredis.Redis, lease_ms: int = 30_000) -> None:
        self.redis = client
        self.lease_ms = lease_ms
        folder = resources.files("services.pool") / "lua"
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script((folder / f"{name}.lua").read_text())
            for name in ("reserve", "renew", "release")
        }
        #: (instance, model) → (when read, slots of the model held there); instance →
        #: (when read, slots held there in all): what routing ranks instances by.
        self._model_held: dict[tuple[str, str], tuple[float, int]] = {}
        self._instance_held: dict[str, tuple[float, int]] = {}
        #: Script calls due while a pipeline is under way: they go together in the next
        #: one, so concurrent requests' reserves and releases share round trips. A reserve
        #: whose caller went away before it was sent is dropped (any other call, a release,
        #: is made whatever became of its caller); one granted to a caller who went away
        #: meanwhile is given back now, not when its lease runs out.
        self._calls: Coalescer[_Call, Any] = Coalescer(
            self._execute,
            BATCH,
            droppable=lambda call: call.script == "reserve",
            orphaned=self._give_back_orphan,
        )
        #: Calls made at once (nothing else was under way) and not answered yet.
        self._direct = 0
        #: Slots held by requests running here → when their lease was last renewed: one
        #: loop renews them all (keep_held), not a timer task per request.
        self._held: dict[SlotGrant, float] = {}

    @staticmethod
    def _keys(instance: str, model: str) -> list[str]:
        ik = InstanceKeys(instance)
        return [ik.slots, ik.model_slots(model)]

    async def try_reserve(
        self,
        instance: str,
        model: str,
        per_model_limit: int,
        instance_limit: int,
        holder: str,
        route: int,
    ) -> SlotGrant | None:
        new_id = slot_id(instance, model, holder, route)
        granted, model_held, instance_held = await self._run(
            "reserve",
            self._keys(instance, model),
            [_now_ms(), self.lease_ms, new_id, per_model_limit, instance_limit],
        )
        now = time.monotonic()
        self._model_held[instance, model] = (now, int(model_held))
        if int(instance_held) >= 0:
            self._instance_held[instance] = (now, int(instance_held))
        elif int(granted) == 1:
            self._count(instance, model, +1, model_too=False)
        if int(granted) != 1:
            return None
        return SlotGrant(new_id, instance, model, holder, route)

    def _count(self, instance: str, model: str, change: int, *, model_too: bool = True) -> None:
        """Move the remembered counts by this replica's own grant or release."""
        if instance in self._instance_held:
            at, held = self._instance_held[instance]
            self._instance_held[instance] = (at, max(0, held + change))
        if model_too and (instance, model) in self._model_held:
            at, held = self._model_held[instance, model]
            self._model_held[instance, model] = (at, max(0, held + change))

    async def renew(self, grant: SlotGrant) -> bool:
        reply = await self._run(
            "renew", self._keys(grant.instance, grant.model), [_now_ms(), self.lease_ms, grant.id]
        )
        return int(reply) == 1

    def hold(self, grant: SlotGrant, renewed_at: float | None = None) -> None:
        """A request runs on ``grant``: keep_held renews its lease until it is released.
        ``renewed_at`` (monotonic): when its lease was last set, if not just now."""
        self._held[grant] = time.monotonic() if renewed_at is None else renewed_at

    def unhold(self, grant: SlotGrant) -> float | None:
        """Stop renewing ``grant`` (it stays held until its lease runs out or it is
        released); when its lease was last set (monotonic), None when it was not held."""
        return self._held.pop(grant, None)

    async def keep_held(self, stop: asyncio.Event) -> None:
        """Renew the leases of the slots held here, every lease at most a third of a lease
        after its last renewal, all due ones in one round trip."""
        interval = self.lease_ms / 6000
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            due = time.monotonic() - self.lease_ms / 3000
            stale = [grant for grant, renewed in self._held.items() if renewed <= due]
            if not stale:
                continue
            keys = self._keys
            renewals = [
                self._call("renew", keys(g.instance, g.model), [_now_ms(), self.lease_ms, g.id])
                for g in stale
            ]
            try:
                await asyncio.gather(*renewals)
            except Exception as exc:  # Redis away: the next pass tries again
                log.warning("slot renewal failed", error=str(exc))
                continue
            now = time.monotonic()
            for grant in stale:
                if grant in self._held:
                    self._held[grant] = now

    def release(self, grant: SlotGrant) -> asyncio.Future[bool]:
        """Free ``grant`` (no longer renewed from now on); the future says whether it was
        still held. It rides the next pipeline with the other replicas' work of the moment."""
        self._held.pop(grant, None)
        reply = self._call("release", self._keys(grant.instance, grant.model), [grant.id])
        released: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def settle(done: asyncio.Future[Any]) -> None:
            if released.done():
                return
            if done.cancelled():
                released.cancel()
            elif (error := done.exception()) is not None:
                released.set_exception(error)
            else:
                if int(done.result()) == 1:
                    self._count(grant.instance, grant.model, -1)
                released.set_result(int(done.result()) == 1)

        reply.add_done_callback(settle)
        return released

    async def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        """A script call's reply: made at once when no other is under way (a lone request
        pays for no pipeline and no task), else in the next pipeline with the others."""
        if self._direct or self._calls.busy:
            return await self._call(script, keys, args)
        self._direct += 1
        try:
            return await self._scripts[script](keys=keys, args=args)
        finally:
            self._direct -= 1

    def _call(self, script: str, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """Queue a script call for the next pipeline; the future carries its reply."""
        return self._calls.submit(_Call(script, keys, args))

    def _give_back_orphan(self, call: _Call, reply: Any) -> None:
        if call.script == "reserve" and int(reply[0]):
            self._call("release", call.keys, [call.args[2]])

    async def _execute(self, calls: Sequence[_Call]) -> list[Any]:
        """The calls' replies (an error in place of a call that failed), in one pipeline."""
        return await run_script_calls(
            self.redis,
            [ScriptCall(self._scripts[call.script], call.keys, call.args) for call in calls],
        )

    async def lookup(self, slot_id: str) -> SlotGrant | None:
        """The grant of a slot that is still held (None when it expired, was released, or
        its id is of an older form); ValueError when the id names no instance."""
        grant = grant_of(slot_id)
        if grant is None:
            return None
        expiry = await self.redis.zscore(
            InstanceKeys(grant.instance).model_slots(grant.model), slot_id
        )
        return grant if expiry is not None and float(expiry) > _now_ms() else None

    async def usage(self, instances: Sequence[str], model: str) -> dict[str, SlotUsage]:
        """Live (unexpired) slots per instance, in one round trip."""
        now = _now_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            for instance in instances:
                ik = InstanceKeys(instance)
                pipe.zcount(ik.model_slots(model), now, "+inf")
                pipe.zcount(ik.slots, now, "+inf")
            counts = cast(list[int], await pipe.execute())
        read_at = time.monotonic()
        for i, instance in enumerate(instances):
            self._model_held[instance, model] = (read_at, int(counts[2 * i]))
            self._instance_held[instance] = (read_at, int(counts[2 * i + 1]))
        return {
            instance: SlotUsage(int(counts[2 * i]), int(counts[2 * i + 1]))
            for i, instance in enumerate(instances)
        }

    def known_usage(self, instances: Sequence[str], model: str) -> dict[str, SlotUsage] | None:
        """Slots per instance as this replica last knew them (read, or returned by a
        reserve, then moved by its own grants and releases), however old; None when a
        count was never read."""
        found: dict[str, SlotUsage] = {}
        for instance in instances:
            in_model = self._model_held.get((instance, model))
            in_all = self._instance_held.get(instance)
            if in_model is None or in_all is None:
                return None
            found[instance] = SlotUsage(in_model[1], in_all[1])
        return found

    async def recent_usage(
        self, instances: Sequence[str], model: str, max_age: float = USAGE_MAX_AGE_SECONDS
    ) -> dict[str, SlotUsage]:
        """Slots per instance as read (or granted) within ``max_age`` seconds, kept current
        by this replica's own grants and releases; read again when any count is older."""
        oldest = time.monotonic() - max_age
        found: dict[str, SlotUsage] = {}
        for instance in instances:
            in_model = self._model_held.get((instance, model))
            in_all = self._instance_held.get(instance)
            if in_model is None or in_all is None or min(in_model[0], in_all[0]) < oldest:
                return await self.usage(instances, model)
            found[instance] = SlotUsage(in_model[1], in_all[1])
        return found
