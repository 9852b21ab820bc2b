"""The gateway's connections: one long-lived gRPC channel per service for the whole process,
the fleet's model catalogue (cached briefly), best-effort HTTP reads of model servers for
``/api/show`` and tag metadata, and background cancels that outlive their HTTP request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.gateway import views
from services.gateway.settings import GatewaySettings
from usher import tracing
from usher.logs import get_logger
from usher.readiness import READINESS_SERVICE
from usher.tls import ClientTls, open_channel
from usher.v1 import (
    notifier_pb2_grpc,
    pool_pb2,
    pool_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

__all__ = ["Backend", "bearer"]

log = get_logger(__name__)
_TAGS_TTL_SECONDS = 30.0


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying ``token`` (none for an empty one: open access)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


class Backend:
    """Stubs for the Scheduler, its admin service, the Notifier and the Pool.

    Build it anywhere; call ``start()`` inside the running event loop (grpc.aio binds a
    channel to the loop that creates it) and ``close()`` at shutdown.
    """

    scheduler: scheduler_pb2_grpc.SchedulerServiceAsyncStub
    admin: scheduler_pb2_grpc.SchedulerAdminServiceAsyncStub
    notifier: notifier_pb2_grpc.NotifierServiceAsyncStub
    pool: pool_pb2_grpc.PoolServiceAsyncStub

    def __init__(self, settings: GatewaySettings, local: grpc.aio.Channel | None = None) -> None:
        self.settings = settings
        #: The services in this process (usher serve): the Scheduler's public API, the
        #: Notifier and the Pool are called through it; admin calls and health checks still
        #: go over gRPC (audited, and checking the servers SDK users reach).
        self.local = local
        self.started_at = time.time()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._instances: list[pool_pb2.InstanceStatus] = []
        self._instances_at = 0.0
        #: views.catalogue of _instances, made when they are fetched (read per request).
        self._catalogue: dict[str, list[str]] = {}
        self._instances_lock = asyncio.Lock()
        self._tags: dict[str, tuple[float, dict[str, dict[str, Any]]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.http: httpx.AsyncClient | None = None
        #: False once a Notifier answered AwaitResult UNIMPLEMENTED (one older than this
        #: gateway, mid-upgrade): answers sent whole then wait through Watch.
        self.await_result = True

    async def start(self) -> None:
        tls = ClientTls.from_env()
        interceptors = tracing.client_interceptors()
        s = self.settings
        for name, address in (
            ("scheduler", s.scheduler_address),
            ("notifier", s.notifier_address),
            ("pool", s.pool_address),
        ):
            self._channels[name] = open_channel(address, tls, interceptors)
        calls = self._channels if self.local is None else dict.fromkeys(self._channels, self.local)
        self.scheduler = scheduler_pb2_grpc.SchedulerServiceStub(calls["scheduler"])
        self.admin = scheduler_pb2_grpc.SchedulerAdminServiceStub(self._channels["scheduler"])
        self.notifier = notifier_pb2_grpc.NotifierServiceStub(calls["notifier"])
        self.pool = pool_pb2_grpc.PoolServiceStub(calls["pool"])
        self.pool_admin = pool_pb2_grpc.PoolAdminServiceStub(self._channels["pool"])
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(5.0, connect=1.0))
        tracing.instrument_httpx(self.http)

    async def close(self, grace_seconds: float = 5.0) -> None:
        if self._tasks:
            # Cancels sent for disconnected clients get a moment to reach the Scheduler.
            await asyncio.wait(list(self._tasks), timeout=grace_seconds)
        for channel in self._channels.values():
            await channel.close()
        if self.http is not None:
            await self.http.aclose()

    # -- background work -----------------------------------------------------------------

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` to its end even if the HTTP request that asked for it is gone."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def cancel(self, request_id: str, token: str, reason: str) -> None:
        """Cancel a request for its owner; a request already finished is no error."""
        try:
            await self.scheduler.Cancel(
                scheduler_pb2.CancelRequest(id=request_id, reason=reason),
                metadata=bearer(token),
                timeout=self.settings.rpc_timeout_seconds,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                log.warning("cancel_failed", request_id=request_id, code=exc.code().name)

    # -- the fleet -----------------------------------------------------------------------

    @property
    def pool_token(self) -> str:
        return self.settings.service_token or self.settings.admin_token

    async def instances(self, *, max_age: float | None = None) -> list[pool_pb2.InstanceStatus]:
        """The Pool's instances, reused for ``model_cache_seconds`` (or ``max_age``)."""
        age = self.settings.model_cache_seconds if max_age is None else max_age
        if self._instances_at and time.monotonic() - self._instances_at <= age:
            return self._instances
        async with self._instances_lock:
            if self._instances_at and time.monotonic() - self._instances_at <= age:
                return self._instances
            reply = await self.pool.ListInstances(
                pool_pb2.ListInstancesRequest(),
                metadata=bearer(self.pool_token),
                timeout=self.settings.rpc_timeout_seconds,
            )
            self._instances = list(reply.instances)
            self._catalogue = views.catalogue(self._instances)
            self._instances_at = time.monotonic()
            return self._instances

    async def catalogue(self, *, max_age: float | None = None) -> dict[str, list[str]]:
        """``views.catalogue`` of ``instances`` (same ages), made once per fetch."""
        await self.instances(max_age=max_age)
        return self._catalogue

    async def resolve_model(self, name: str) -> str | None:
        """The fleet's name for ``name``, None when no local instance has it.

        A model missing from a cached list is looked up once more with a fresh list, so a
        model pulled a moment ago is found. When the Pool cannot be asked, the name is
        passed on as given (the Scheduler still validates it).
        """
        try:
            found = views.resolve_model(name, await self.catalogue())
            if found is None:
                found = views.resolve_model(name, await self.catalogue(max_age=0.0))
        except grpc.aio.AioRpcError as exc:
            log.warning("pool_unreachable", code=exc.code().name)
            return name
        return found

    async def tag_metadata(
        self, instances: Sequence[pool_pb2.InstanceStatus]
    ) -> dict[str, dict[str, Any]]:
        """Model → an instance's own ``/api/tags`` entry (size, digest, details), asking
        each healthy Ollama instance at most every 30 s; instances that do not answer are
        skipped."""
        wanted = [
            s
            for s in instances
            if not s.config.external
            and s.config.kind == pool_pb2.INSTANCE_KIND_OLLAMA
            and s.health == pool_pb2.INSTANCE_HEALTH_HEALTHY
        ]
        now = time.monotonic()
        stale = [
            s
            for s in wanted
            if now - self._tags.get(s.config.id, (-1e9, {}))[0] > _TAGS_TTL_SECONDS
        ]
        if stale:
            answers = await asyncio.gather(*(self._fetch_tags(s) for s in stale))
            for status, entries in zip(stale, answers, strict=True):
                if entries is not None:
                    self._tags[status.config.id] = (now, entries)
        merged: dict[str, dict[str, Any]] = {}
        for status in wanted:
            for model, entry in self._tags.get(status.config.id, (0.0, {}))[1].items():
                merged.setdefault(model, entry)
        return merged

    async def _fetch_tags(
        self, status: pool_pb2.InstanceStatus
    ) -> dict[str, dict[str, Any]] | None:
        assert self.http is not None
        try:
            reply = await self.http.get(
                status.config.base_url.rstrip("/") + "/api/tags", timeout=1.0
            )
            reply.raise_for_status()
            data = reply.json()
        except (httpx.HTTPError, ValueError):
            return None
        models = data.get("models") if isinstance(data, dict) else None
        if not isinstance(models, list):
            return None
        return {
            str(m.get("name") or m.get("model")): m
            for m in models
            if isinstance(m, dict) and (m.get("name") or m.get("model"))
        }

    async def show(self, model: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """``/api/show`` answered by an Ollama instance that has the model, or None."""
        assert self.http is not None
        instances = await self.instances()
        hosts = views.catalogue(instances).get(model, [])
        by_id = {s.config.id: s for s in instances}
        candidates = sorted(
            (by_id[i] for i in hosts if i in by_id),
            key=lambda s: s.health != pool_pb2.INSTANCE_HEALTH_HEALTHY,
        )
        for status in candidates:
            if status.config.kind != pool_pb2.INSTANCE_KIND_OLLAMA:
                continue
            try:
                reply = await self.http.post(
                    status.config.base_url.rstrip("/") + "/api/show",
                    json={**body, "model": model},
                    timeout=5.0,
                )
                if reply.status_code == 200:
                    data = reply.json()
                    if isinstance(data, dict):
                        return data
            except (httpx.HTTPError, ValueError):
                continue
        return None

    # -- health --------------------------------------------------------------------------

    async def health(self) -> dict[str, str]:
        """Readiness of each service (grpc.health.v1 "readiness": the Scheduler's and the
        Notifier's Redis, the Pool's Redis and serving instances): "serving", or what went
        wrong."""

        async def check(name: str) -> tuple[str, str]:
            stub = health_pb2_grpc.HealthStub(self._channels[name])
            try:
                reply = await stub.Check(
                    health_pb2.HealthCheckRequest(service=READINESS_SERVICE), timeout=2.0
                )
            except grpc.aio.AioRpcError as exc:
                return name, exc.code().name.lower()
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
            return name, "serving" if serving else "not_serving"

        results = await asyncio.gather(*(check(n) for n in self._channels))
        return dict(results)
