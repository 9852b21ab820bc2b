"""The Redis connection every service shares: bytes in and out, retries across restarts."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError

__all__ = ["connect_redis"]


def connect_redis(
    url: str, retry_seconds: float = 5.0, max_connections: int = 64
) -> aioredis.Redis:
    """A client that rides out a short Redis restart (AOF reload) by retrying.

    Retrying is safe for Usher's writes because each script is idempotent in the request id
    it is given (a repeated enqueue finds the request already there). The pool blocks (up to
    5 s) rather than failing when every connection is busy, so a burst of calls queues
    briefly instead of erroring.
    """
    attempts = max(1, int(retry_seconds / 0.25))
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=5,
        decode_responses=False,
        health_check_interval=10,
        socket_connect_timeout=2,
        socket_keepalive=True,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), attempts),
        retry_on_error=[ConnectionError, TimeoutError, BusyLoadingError],
    )
    return aioredis.Redis.from_pool(pool)
