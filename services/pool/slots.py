"""Slot leases on Redis, shared by every Pool replica.

Ollama exposes no queue depth, so the Pool counts in-flight work itself: a request may run
on an instance only while it holds one of that instance's slots for its model. Slots are
leases that expire, so a replica that dies mid-request frees its slots within one lease.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import cast

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from usher.keys import InstanceKeys

__all__ = ["SlotGrant", "SlotStore", "SlotUsage"]


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


def instance_of(slot_id: str) -> str:
    """Slot ids are "<instance>/<token>", so any replica can find a slot's keys."""
    instance, sep, token = slot_id.rpartition("/")
    if not sep or not instance or not token:
        raise ValueError(f"{slot_id!r} is not a slot id")
    return instance


class SlotStore:
    def __init__(self, client: aioredis.Redis, lease_ms: int = 30_000) -> None:
        self.redis = client
        self.lease_ms = lease_ms
        folder = resources.files("services.pool") / "lua"
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script((folder / f"{name}.lua").read_text())
            for name in ("reserve", "renew", "release")
        }

    @staticmethod
    def _keys(instance: str, model: str, slot_id: str) -> list[str]:
        ik = InstanceKeys(instance)
        return [ik.slots, ik.model_slots(model), ik.slot(slot_id)]

    async def try_reserve(
        self,
        instance: str,
        model: str,
        per_model_limit: int,
        instance_limit: int,
        holder: str,
        route: int,
    ) -> SlotGrant | None:
        slot_id = f"{instance}/{secrets.token_hex(8)}"
        granted = await self._scripts["reserve"](
            keys=self._keys(instance, model, slot_id),
            args=[
                _now_ms(),
                self.lease_ms,
                slot_id,
                per_model_limit,
                instance_limit,
                "model",
                model,
                "holder",
                holder,
                "route",
                route,
            ],
        )
        if int(granted) != 1:
            return None
        return SlotGrant(slot_id, instance, model, holder, route)

    async def renew(self, grant: SlotGrant) -> bool:
        reply = await self._scripts["renew"](
            keys=self._keys(grant.instance, grant.model, grant.id),
            args=[_now_ms(), self.lease_ms, grant.id],
        )
        return int(reply) == 1

    async def release(self, grant: SlotGrant) -> bool:
        reply = await self._scripts["release"](
            keys=self._keys(grant.instance, grant.model, grant.id), args=[grant.id]
        )
        return int(reply) == 1

    async def lookup(self, slot_id: str) -> SlotGrant | None:
        instance = instance_of(slot_id)
        raw = cast(
            dict[bytes, bytes], await self.redis.hgetall(InstanceKeys(instance).slot(slot_id))
        )
        if not raw:
            return None
        return SlotGrant(
            slot_id,
            instance,
            raw[b"model"].decode(),
            raw.get(b"holder", b"").decode(),
            int(raw.get(b"route", b"0")),
        )

    async def usage(self, instances: Sequence[str], model: str) -> dict[str, SlotUsage]:
        """Live (unexpired) slots per instance, in one round trip."""
        now = _now_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            for instance in instances:
                ik = InstanceKeys(instance)
                pipe.zcount(ik.model_slots(model), now, "+inf")
                pipe.zcount(ik.slots, now, "+inf")
            counts = cast(list[int], await pipe.execute())
        return {
            instance: SlotUsage(int(counts[2 * i]), int(counts[2 * i + 1]))
            for i, instance in enumerate(instances)
        }
