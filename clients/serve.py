"""``usher serve``: Scheduler, Pool, Notifier and the HTTP gateway in one process and one
event loop — the all-in-one shape for one to three machines (``usher up`` runs it).

The same services as the trio, from the same settings (``USHER_REDIS_URL``,
``USHER_INSTANCES`` / ``USHER_POOL_CONFIG`` / ``OLLAMA_HOST``, ``USHER_API_TOKENS``,
``USHER_AUTH_OPEN``, ``USHER_GATEWAY_LISTEN``, ``USHER_SCHEDULER_LISTEN``,
``USHER_POOL_LISTEN``, ``USHER_NOTIFIER_LISTEN``, …): every guarantee stays in Redis (the
durable fair queue, leases, status streams), and the gRPC APIs are served on the usual
addresses for the SDK, the CLI and other replicas. Inside the process the gateway and the
dispatchers call the services through an in-process channel (``usher.inprocess``): the same
servicers, the same stubs, without serialization, sockets or extra processes. Admin calls
and health checks still go over gRPC to this process, so they are audited as in the trio.

This module is the composition root: it imports every service, so it lives above
``services/`` (in ``clients/``).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
from collections.abc import Mapping, Sequence

from services.gateway.app import app_runner, build_app, start_listening
from services.gateway.backend import Backend
from services.gateway.settings import GatewaySettings
from services.notifier.app import NotifierApp
from services.notifier.settings import NotifierSettings
from services.pool.app import PoolApp
from services.pool.settings import load_pool_settings
from services.scheduler.app import SchedulerApp
from services.scheduler.settings import SchedulerSettings
from usher import eventloop, tracing
from usher.config import ConfigError
from usher.inprocess import LocalChannel
from usher.logs import configure_logging, get_logger
from usher.production import require_production_ready
from usher.v1 import pool_pb2_grpc

__all__ = ["ServeApp", "dial_address", "main", "serve_environment"]

log = get_logger(__name__)

#: The services' listen settings and their defaults (as each service reads them).
_LISTEN = {
    "USHER_SCHEDULER_LISTEN": ("USHER_SCHEDULER_ADDRESS", "127.0.0.1:50051"),
    "USHER_POOL_LISTEN": ("USHER_POOL_ADDRESS", "127.0.0.1:50052"),
    "USHER_NOTIFIER_LISTEN": ("USHER_NOTIFIER_ADDRESS", "127.0.0.1:50053"),
}


def dial_address(listen: str) -> str:
    """Where this machine reaches a server listening on ``listen`` (a wildcard host is
    reached on loopback)."""
    host, _, port = listen.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def serve_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The settings each service of the process reads: ``environ``, with the addresses the
    services reach each other at set to their own listen addresses, and a service credential
    minted for this process's own calls when ``USHER_SERVICE_TOKEN`` is unset."""
    env = dict(environ)
    for listen, (address, default) in _LISTEN.items():
        env[address] = dial_address(environ.get(listen, "").strip() or default)
    if not environ.get("USHER_SERVICE_TOKEN", "").strip():
        token = secrets.token_urlsafe(24)
        env["USHER_SERVICE_TOKEN"] = token
        own = f"{token}=usher@serve:service"
        tokens = environ.get("USHER_API_TOKENS", "").strip()
        env["USHER_API_TOKENS"] = f"{tokens},{own}" if tokens else own
    return env


class ServeApp:
    """The four services wired in one event loop (build it inside the running loop)."""

    def __init__(self, env: Mapping[str, str]) -> None:
        # One /metrics endpoint for the process (one registry): the Scheduler's.
        quiet = {k: v for k, v in env.items() if k != "USHER_METRICS_PORT"}
        self.pool = PoolApp(load_pool_settings(quiet))
        # The Scheduler's dispatchers call the Pool through this channel, so it is built
        # before the Scheduler; the others' servicers join it once built.
        self.local = LocalChannel.serving(self.pool.registrations)
        self.scheduler = SchedulerApp(
            SchedulerSettings.from_env(env),
            pool=pool_pb2_grpc.PoolServiceStub(self.local.as_channel()),
        )
        self.notifier = NotifierApp(NotifierSettings.from_env(quiet))
        # A completion's events reach the Notifier's watchers as soon as its script returns
        # (no wait for the stream reader, no read of the record); the reader still reads
        # the streams, for what other processes write and for anything not handed over.
        self.scheduler.store.on_written = self.notifier.fanout.hand_over
        for registration in (*self.scheduler.registrations, *self.notifier.registrations):
            registration.add(self.local.as_server())
        self.gateway_settings = GatewaySettings.from_env(env)
        self.backend = Backend(self.gateway_settings, self.local.as_channel())
        self.runner = app_runner(
            build_app(self.gateway_settings, self.backend), self.gateway_settings
        )
        self._stop = asyncio.Event()

    async def start(self) -> None:
        # The Pool first: the dispatchers reserve its slots as soon as they start.
        await self.pool.start()
        await asyncio.gather(self.scheduler.start(), self.notifier.start())
        await start_listening(self.runner, self.gateway_settings)
        log.info("usher serving", gateway=self.gateway_settings.listen)

    async def stop(self) -> None:
        # The gateway first (its answers finish while the dispatchers still run them), then
        # the Scheduler drains its running requests while the Pool still serves them.
        await self.runner.cleanup()
        await asyncio.gather(self.scheduler.stop(), self.notifier.stop())
        await self.pool.stop()

    async def run(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            await self._stop.wait()
        finally:
            log.info("usher stopping")
            await self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    if argv:
        print(
            "usher serve takes no arguments: it reads the services' USHER_* settings",
            file=sys.stderr,
        )
        return 2
    try:
        require_production_ready()
        env = serve_environment(os.environ)
        level = SchedulerSettings.from_env(env).log_level
    except ConfigError as exc:
        print(f"usher serve: bad configuration: {exc}", file=sys.stderr)
        return 2
    configure_logging(level)
    tracing.configure_tracing("usher-serve")

    async def serve() -> None:
        # Built inside the running loop: grpc.aio binds servers and channels to it.
        try:
            app = ServeApp(env)
        except ConfigError as exc:
            print(f"usher serve: bad configuration: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        await app.run()

    eventloop.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
