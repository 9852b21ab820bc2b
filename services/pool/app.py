"""Wiring of one Pool replica: registry, health loop, placement loop, slots, gRPC server."""

from __future__ import annotations

import asyncio
import contextlib

from services.pool.placer import place_forever
from services.pool.registry import Registry
from services.pool.service import FleetRouter, PoolAdminServicer, PoolServicer
from services.pool.settings import PoolSettings
from services.pool.slots import SlotStore
from services.pool.stats import PoolStats
from usher import metrics
from usher.audit import AuditInterceptor, AuditLog
from usher.auth import Authenticator
from usher.connections import connect_redis
from usher.logs import get_logger
from usher.metrics import metrics_host, serve_metrics
from usher.readiness import redis_answers, watch_readiness
from usher.server import GrpcServer, Registration
from usher.tls import ServerTls
from usher.v1 import pool_pb2, pool_pb2_grpc

__all__ = ["PoolApp"]

log = get_logger(__name__)


class PoolApp:
    def __init__(self, settings: PoolSettings) -> None:
        self.settings = settings
        self.redis = connect_redis(settings.redis_url)
        self.registry = Registry(settings, self.redis)
        self.slots = SlotStore(self.redis, lease_ms=int(settings.slot_lease_seconds * 1000))
        self.router = FleetRouter(self.registry, self.slots, settings)
        auth = Authenticator.from_env(settings.tokens)
        self.audit = AuditLog(self.redis)
        self.stats = PoolStats(self.redis)
        public = PoolServicer(self.router, self.stats, auth, settings)
        admin = PoolAdminServicer(self.registry, auth)
        services = pool_pb2.DESCRIPTOR.services_by_name
        #: The servicers, for the gRPC server and for an in-process channel (usher serve).
        self.registrations = [
            Registration.of(
                pool_pb2_grpc.add_PoolServiceServicer_to_server, public, services["PoolService"]
            ),
            Registration.of(
                pool_pb2_grpc.add_PoolAdminServiceServicer_to_server,
                admin,
                services["PoolAdminService"],
            ),
        ]
        self.server = GrpcServer(
            self.registrations,
            settings.listen,
            grace_seconds=settings.shutdown_grace_seconds,
            tls=ServerTls.from_env(),
            interceptors=[AuditInterceptor(self.audit, auth.authenticate)],
        )
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _health_forever(self) -> None:
        while not self._stop.is_set():
            try:
                await self.registry.sync_shared()
                await self.registry.sync_model_parallel()
                await self.registry.check_all()
                await self._publish_slot_use()
            except Exception as exc:  # Redis away: keep the last known state and retry.
                log.warning("health pass failed", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.settings.health_interval_seconds)

    async def _ready(self) -> bool:
        """Redis answers and at least one instance serves (healthy, not draining)."""
        return self.registry.serving() > 0 and await redis_answers(self.redis)

    async def _publish_slot_use(self) -> None:
        ids = list(self.registry.instances)
        for model in {m for s in self.registry.instances.values() for m in s.loaded}:
            for instance, usage in (await self.slots.usage(ids, model)).items():
                metrics.SLOTS_IN_USE.labels(instance, model).set(usage.model_active)

    async def start(self) -> None:
        serve_metrics(self.settings.metrics_port, metrics_host(self.settings.listen))
        await self.registry.sync_shared()
        await self.registry.check_all()
        await self.server.start()
        self._tasks = [
            asyncio.create_task(self._health_forever()),
            asyncio.create_task(
                place_forever(
                    self.registry, self.slots, self.settings.placement_interval_seconds, self._stop
                )
            ),
            asyncio.create_task(watch_readiness(self._ready, self.server.set_ready, self._stop)),
            asyncio.create_task(self.slots.keep_held(self._stop)),
            asyncio.create_task(self.router.watch_usage(self._stop)),
        ]
        log.info(
            "pool listening",
            address=self.settings.listen,
            port=self.server.port,
            instances=len(self.registry.instances),
        )

    async def stop(self) -> None:
        await self.server.stop()
        self._stop.set()
        await asyncio.gather(*self._tasks)
        with contextlib.suppress(Exception):  # Redis away: the samples are only statistics
            await self.stats.aclose()
        await self.registry.aclose()
        await self.audit.aclose()
        await self.redis.aclose()

    async def run(self) -> None:
        await self.start()
        self.server.install_signal_handlers()
        await self.server.wait()
        await self.stop()
