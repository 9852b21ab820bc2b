"""Wiring of one scheduler replica: Redis, store, servicers, reaper, gRPC server."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from services.scheduler.dispatcher import Dispatcher, DispatchSettings
from services.scheduler.quotas import Quotas
from services.scheduler.reaper import reap_forever
from services.scheduler.service import SchedulerAdminServicer, SchedulerServicer
from services.scheduler.settings import SchedulerSettings
from services.scheduler.store import QueueStore
from usher.audit import AuditInterceptor, AuditLog
from usher.auth import Authenticator
from usher.connections import connect_redis
from usher.crypto import sealer_from_env
from usher.logs import get_logger
from usher.metrics import metrics_host, serve_metrics
from usher.readiness import redis_answers, watch_readiness
from usher.server import GrpcServer, Registration
from usher.tls import ServerTls
from usher.v1 import pool_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

__all__ = ["SchedulerApp"]

log = get_logger(__name__)


@dataclass
class SchedulerApp:
    settings: SchedulerSettings
    #: The Pool the dispatcher calls; None = a gRPC channel to ``settings.pool_address``
    #: (``usher serve`` passes a stub over its in-process channel).
    pool: pool_pb2_grpc.PoolServiceAsyncStub | None = None

    def __post_init__(self) -> None:
        self.redis = connect_redis(self.settings.redis_url)
        self.store = QueueStore(self.redis, self.settings.queue_defaults(), sealer_from_env())
        auth = Authenticator.from_env(self.settings.tokens)
        self.quotas = Quotas(self.redis, self.settings.tenant_limits)
        self.audit = AuditLog(self.redis)
        public = SchedulerServicer(self.store, auth, self.settings, self.quotas, self.audit)
        admin = SchedulerAdminServicer(self.store, auth, self.settings, self.quotas, self.audit)
        services = scheduler_pb2.DESCRIPTOR.services_by_name
        #: The servicers, for the gRPC server and for an in-process channel (usher serve).
        self.registrations = [
            Registration.of(
                scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server,
                public,
                services["SchedulerService"],
            ),
            Registration.of(
                scheduler_pb2_grpc.add_SchedulerAdminServiceServicer_to_server,
                admin,
                services["SchedulerAdminService"],
            ),
        ]
        self.server = GrpcServer(
            self.registrations,
            self.settings.listen,
            grace_seconds=self.settings.shutdown_grace_seconds,
            tls=ServerTls.from_env(),
            interceptors=[AuditInterceptor(self.audit, auth.authenticate)],
        )
        self.dispatcher: Dispatcher | None = None
        if self.settings.pool_address:
            self.dispatcher = Dispatcher(
                self.store,
                self.quotas,
                DispatchSettings(
                    self.settings.pool_address,
                    self.settings.service_token,
                    concurrency=self.settings.dispatch_concurrency,
                    drain_seconds=max(0.0, self.settings.shutdown_grace_seconds - 2),
                    retry_backoff_seconds=self.settings.retry_backoff_seconds,
                    retry_backoff_max_seconds=self.settings.retry_backoff_max_seconds,
                    idle_seconds=self.settings.dispatch_idle_seconds,
                ),
                self.pool,
            )
        if self.dispatcher is not None:
            public.on_queued = self.dispatcher.notify_submitted
            public.expect = self.dispatcher.expect
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        serve_metrics(self.settings.metrics_port, metrics_host(self.settings.listen))
        await self.server.start()
        self._tasks.append(
            asyncio.create_task(
                reap_forever(
                    self.store,
                    self.settings.reap_interval_seconds,
                    self._stopping,
                    self.quotas,
                    self.dispatcher.notify_work if self.dispatcher is not None else None,
                )
            )
        )
        if self.dispatcher is not None:
            self._tasks.append(asyncio.create_task(self.dispatcher.run(self._stopping)))
        self._tasks.append(
            asyncio.create_task(
                watch_readiness(
                    lambda: redis_answers(self.redis), self.server.set_ready, self._stopping
                )
            )
        )
        log.info("scheduler listening", address=self.settings.listen, port=self.server.port)

    async def stop(self) -> None:
        # Stop claiming (and start the drain clock) while the server finishes its calls.
        self._stopping.set()
        await self.server.stop()
        await asyncio.gather(*self._tasks)
        if self.dispatcher is not None:
            await self.dispatcher.aclose()
        await self.quotas.flush()
        await self.audit.aclose()
        await self.redis.aclose()

    async def run(self) -> None:
        await self.start()
        self.server.install_signal_handlers()
        await self.server.wait()
        await self.stop()
