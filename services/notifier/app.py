"""Wiring of one Notifier replica: the shared event reader, the badge board, gRPC server."""

from __future__ import annotations

import asyncio

from services.notifier.badges import BadgeBoard
from services.notifier.fanout import Fanout
from services.notifier.heap import HeapFreezer
from services.notifier.service import NotifierServicer
from services.notifier.settings import NotifierSettings
from usher.auth import Authenticator
from usher.connections import connect_redis
from usher.crypto import sealer_from_env
from usher.logs import get_logger
from usher.metrics import metrics_host, serve_metrics
from usher.queue.reads import QueueReader
from usher.readiness import redis_answers, watch_readiness
from usher.server import GrpcServer, Registration
from usher.tls import ServerTls
from usher.v1 import notifier_pb2, notifier_pb2_grpc

__all__ = ["NotifierApp"]

log = get_logger(__name__)


class NotifierApp:
    def __init__(self, settings: NotifierSettings) -> None:
        self.settings = settings
        self.redis = connect_redis(settings.redis_url)
        self.queue = QueueReader(self.redis, settings.queue_defaults(), sealer_from_env())
        self.fanout = Fanout(
            self.queue,
            settings.position_interval_seconds,
            settings.position_updates_per_second,
        )
        # Capacity per model comes from the Pool through Redis (usher.keys.POOL_CAPACITY).
        self.board = BadgeBoard(
            self.queue, None, settings.external_alternative, settings.badge_interval_seconds
        )
        servicer = NotifierServicer(
            self.queue, self.fanout, self.board, Authenticator.from_env(settings.tokens)
        )
        #: The servicer, for the gRPC server and for an in-process channel (usher serve).
        self.registrations = [
            Registration(
                lambda s: notifier_pb2_grpc.add_NotifierServiceServicer_to_server(servicer, s),
                notifier_pb2.DESCRIPTOR.services_by_name["NotifierService"].full_name,
            )
        ]
        self.server = GrpcServer(
            self.registrations,
            settings.listen,
            grace_seconds=settings.shutdown_grace_seconds,
            tls=ServerTls.from_env(),
        )
        self.heap = HeapFreezer(settings.heap_freeze_seconds)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        serve_metrics(self.settings.metrics_port, metrics_host(self.settings.listen))
        await self.fanout.prime()
        await self.server.start()
        self._tasks = [
            asyncio.create_task(self.fanout.run(self._stop)),
            asyncio.create_task(self.board.run(self._stop)),
            asyncio.create_task(self.heap.run(self._stop)),
            asyncio.create_task(
                watch_readiness(
                    lambda: redis_answers(self.redis), self.server.set_ready, self._stop
                )
            ),
        ]
        log.info("notifier listening", address=self.settings.listen, port=self.server.port)

    async def stop(self) -> None:
        self._stop.set()
        await self.server.stop()
        await asyncio.gather(*self._tasks)
        await self.redis.aclose()

    async def run(self) -> None:
        await self.start()
        self.server.install_signal_handlers()
        await self.server.wait()
        await self.stop()
