"""Readiness, apart from liveness: a process that answers is alive (grpc.health.v1 service
"" and each API's name stay SERVING until it drains), but it is *ready* only while what it
needs answers too. Each service reports readiness as the health service ``readiness``
(Kubernetes: ``readinessProbe.grpc.service: readiness``):

* Scheduler and Notifier: Redis answers. (A Scheduler keeps taking requests while the
  fleet is down: queueing them is its job.)
* Pool: Redis answers and at least one instance is serving (healthy, not draining).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from usher.logs import get_logger

__all__ = ["READINESS_SERVICE", "redis_answers", "watch_readiness"]

log = get_logger(__name__)

#: The grpc.health.v1 service name that reports readiness.
READINESS_SERVICE = "readiness"
#: How often readiness is checked.
INTERVAL_SECONDS = 1.0


async def redis_answers(client: aioredis.Redis, timeout: float = 2.0) -> bool:
    """Redis answers a PING within ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            return bool(await client.ping())
    except Exception:  # unreachable, loading, refused: not ready, whatever the cause
        return False


async def watch_readiness(
    check: Callable[[], Awaitable[bool]],
    report: Callable[[bool], Awaitable[None]],
    stop: asyncio.Event,
    interval: float = INTERVAL_SECONDS,
) -> None:
    """Report ``check()`` every ``interval`` until ``stop``; a check that raises is "not
    ready". Changes are logged."""
    last: bool | None = None
    while not stop.is_set():
        try:
            ready = await check()
        except Exception:
            ready = False
        if ready != last:
            log.info("readiness", ready=ready)
            last = ready
        await report(ready)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
