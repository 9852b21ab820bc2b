"""gRPC server bootstrap shared by every service: health, reflection, error mapping, and a
graceful drain on SIGTERM (health goes NOT_SERVING, in-flight calls get a grace period)."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import Field

from usher import eventloop, metrics, tracing
from usher.config import ConfigError
from usher.errors import ErrorMappingInterceptor
from usher.grpc_types import MethodHandler
from usher.logs import configure_logging, get_logger
from usher.production import require_production_ready
from usher.readiness import READINESS_SERVICE
from usher.settings import UsherSettings
from usher.tls import ServerTls

__all__ = [
    "ConnectionSettings",
    "GrpcServer",
    "Registration",
    "connection_age_options",
    "run_service",
]

log = get_logger(__name__)


#: A client connection is asked to move on (GOAWAY) after about this long, so clients
#: resolve the service again and new replicas get calls; calls in flight then have the grace
#: to finish (a Watch cut after it resumes from its last event).
DEFAULT_MAX_CONNECTION_AGE_SECONDS = 60.0
DEFAULT_MAX_CONNECTION_AGE_GRACE_SECONDS = 300.0


class ConnectionSettings(UsherSettings):
    """How long a client connection to a gRPC service lasts (every service reads them)."""

    #: 0 = no limit.
    grpc_max_connection_age_seconds: float = Field(DEFAULT_MAX_CONNECTION_AGE_SECONDS, ge=0)
    grpc_max_connection_age_grace_seconds: float = Field(
        DEFAULT_MAX_CONNECTION_AGE_GRACE_SECONDS, ge=0
    )


def connection_age_options(
    env: Mapping[str, str] | None = None,
) -> list[tuple[str, int]]:
    """gRPC server options from USHER_GRPC_MAX_CONNECTION_AGE_SECONDS (0 = no limit) and
    USHER_GRPC_MAX_CONNECTION_AGE_GRACE_SECONDS."""
    settings = ConnectionSettings.from_env(env)
    age, grace = (
        settings.grpc_max_connection_age_seconds,
        settings.grpc_max_connection_age_grace_seconds,
    )
    if age == 0:
        return []
    return [
        ("grpc.max_connection_age_ms", round(age * 1000)),
        ("grpc.max_connection_age_grace_ms", round(grace * 1000)),
    ]


class _CallCounter(grpc.aio.ServerInterceptor):
    """Counts every call by method (health checks aside) in usher_grpc_server_calls_total."""

    def __init__(self) -> None:
        self._calls = metrics.Children(metrics.GRPC_CALLS)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[MethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> MethodHandler | None:
        method = str(handler_call_details.method)
        if not method.startswith("/grpc."):
            self._calls(method).inc()
        return await continuation(handler_call_details)


@dataclass(frozen=True, slots=True)
class Registration:
    """One servicer: how to add it and its full service name (for health and reflection)."""

    add: Callable[[grpc.aio.Server], None]
    service_name: str

    @classmethod
    def of(
        cls,
        add: Callable[[ServicerT, grpc.aio.Server], None],
        servicer: ServicerT,
        service: ServiceDescriptor,
    ) -> Registration:
        """``servicer`` of ``service``, added by its generated ``add_*_to_server``."""
        return cls(lambda server: add(servicer, server), service.full_name)


class GrpcServer:
    """A grpc.aio server on ``address`` with the given servicers."""

    def __init__(
        self,
        registrations: Sequence[Registration],
        address: str,
        grace_seconds: float = 10.0,
        tls: ServerTls | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        self._server = grpc.aio.server(
            # Outermost first: tracing sees everything; the given interceptors (audit) see
            # domain errors before they become statuses.
            interceptors=[
                *tracing.server_interceptors(),
                _CallCounter(),
                ErrorMappingInterceptor(),
                *interceptors,
            ],
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.http2.max_pings_without_data", 0),
                # Our own clients ping every 10 s (usher.tls.KEEPALIVE): allow it.
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                # Thousands of watchers reconnect at once after a restart: let them queue.
                ("grpc.server.max_pending_requests", 20_000),
                ("grpc.server.max_pending_requests_hard_limit", 40_000),
                *connection_age_options(),
            ],
        )
        self._grace = grace_seconds
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        names = [r.service_name for r in registrations]
        for registration in registrations:
            registration.add(self._server)
        reflection.enable_server_reflection(
            [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server
        )
        self._names = names
        if tls is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, tls.credentials())
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        await self._server.start()
        for name in ["", *self._names]:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        # Not ready until the service's own check (usher.readiness) says so.
        await self.set_ready(False)

    async def set_ready(self, ready: bool) -> None:
        """Report readiness (health service "readiness"); liveness is unaffected. Once
        draining, everything stays NOT_SERVING."""
        if self._stopped.is_set():
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self._health.set(READINESS_SERVICE, status)

    async def stop(self) -> None:
        """Drain: report NOT_SERVING, refuse new calls, let in-flight ones finish."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        await self._health.enter_graceful_shutdown()
        await self._server.stop(self._grace)

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.stop()))

    async def wait(self) -> None:
        await self._server.wait_for_termination()


class _Settings(Protocol):
    @property
    def log_level(self) -> str: ...


class _App(Protocol):
    async def run(self) -> None: ...


S = TypeVar("S", bound=_Settings)
ServicerT = TypeVar("ServicerT")


def run_service(prog: str, load: Callable[[], S], make_app: Callable[[S], _App]) -> None:
    """The ``python -m services.X`` entry point: settings from the environment (a bad one
    exits 2 with the variable named; so do placeholder secrets with USHER_PRODUCTION=true),
    logging and tracing, then serve until SIGTERM."""
    try:
        require_production_ready()
        settings = load()
    except ConfigError as exc:
        print(f"{prog}: bad configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level)
    tracing.configure_tracing(prog)

    async def serve() -> None:
        # Built inside the running loop: grpc.aio binds its server to the loop creating it.
        await make_app(settings).run()

    eventloop.run(serve())
