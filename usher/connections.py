"""The Redis connection every service shares: bytes in and out, retries across restarts and
failovers, and the topology (standalone, Sentinel, Cluster) chosen by one URL.

``USHER_REDIS_URL`` forms:

- ``redis://[user:password@]host:port/db`` and ``rediss://…`` (TLS): one server, through
  redis-py's own URL parsing (every query option it knows works).
- ``redis+sentinel://[user:password@]host:port[,host:port…]/SERVICE[/db]`` (and
  ``rediss+sentinel://``): the primary Sentinel names for SERVICE, rediscovered after a
  failover. The URL's credentials are the data nodes'; ``?sentinel_password=…`` (and
  ``sentinel_username``) when the sentinels require their own.
- ``redis+cluster://[user:password@]host:port[,host:port…]`` (and ``rediss+cluster://``):
  a Redis Cluster from these seed nodes; slots are followed as they move.

Every form takes ``?retry_seconds=N`` (how long one command keeps retrying while Redis is
unreachable: a restart, an election) and the TLS options ``ssl_ca_certs``,
``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    ConnectionError,
    ReadOnlyError,
    TimeoutError,
)

__all__ = [
    "RedisTarget",
    "connect_redis",
    "is_cluster",
    "parse_redis_url",
    "redacted_redis_url",
]

Topology = Literal["standalone", "sentinel", "cluster"]

#: How long a command retries by default: a standalone restart (AOF reload) is seconds; a
#: Sentinel or Cluster election takes the failure-detection time plus a vote.
DEFAULT_RETRY_SECONDS: Mapping[Topology, float] = {
    "standalone": 5.0,
    "sentinel": 30.0,
    "cluster": 30.0,
}
#: How long a call waits for a free connection of the pool before failing. Every one busy
#: means a loop saturated by a burst (500 streams starting at once in one process), whose
#: replies come late: its calls should wait their turn, as the requests in the queue do,
#: not fail (5 s failed dispatcher claims and Submits in the streaming bench).
POOL_WAIT_SECONDS = 30.0
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
#: Query options whose values are secrets, hidden by ``redacted_redis_url``.
_SECRET_OPTIONS = ("sentinel_password", "password")
_OWN_OPTIONS = ("retry_seconds", "sentinel_password", "sentinel_username", *_TLS_OPTIONS)
_SCHEMES: Mapping[str, tuple[Topology, bool]] = {
    "redis": ("standalone", False),
    "rediss": ("standalone", True),
    "unix": ("standalone", False),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """What one ``USHER_REDIS_URL`` names."""

    topology: Topology
    #: Standalone: the URL redis-py parses itself (without Usher's own options).
    url: str = ""
    #: Sentinel: the sentinels; Cluster: the seed nodes.
    nodes: tuple[tuple[str, int], ...] = ()
    #: Sentinel: the name of the monitored primary.
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    tls_options: Mapping[str, str] = field(default_factory=dict)
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    retry_seconds: float = 5.0


def _bad(url: str, why: str) -> ValueError:
    return ValueError(f"USHER_REDIS_URL {redacted_redis_url(url)!r}: {why}")


def _nodes(url: str, netloc: str) -> tuple[tuple[str, int], ...]:
    hosts = netloc.rsplit("@", 1)[-1]
    nodes: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep:
            host, port = item.strip(), "6379" if "cluster" in url.split(":", 1)[0] else "26379"
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise _bad(url, f"{item!r} is not host:port")
        nodes.append((host, int(port)))
    return tuple(nodes)


def _credentials(netloc: str) -> tuple[str | None, str | None]:
    if "@" not in netloc:
        return None, None
    userinfo = netloc.rsplit("@", 1)[0]
    # As redis-py reads any Redis URL: "user@host" names a user, ":password@host" a password.
    user, _sep, password = userinfo.partition(":")
    return unquote(user) or None, unquote(password) or None


def _retry_seconds(url: str, options: Mapping[str, str], topology: Topology) -> float:
    raw = options.get("retry_seconds")
    if raw is None:
        return DEFAULT_RETRY_SECONDS[topology]
    try:
        seconds = float(raw)
    except ValueError:
        raise _bad(url, "retry_seconds must be a number of seconds") from None
    if not 0 <= seconds <= 600:
        raise _bad(url, "retry_seconds must be between 0 and 600")
    return seconds


def parse_redis_url(url: str) -> RedisTarget:
    """The topology, nodes and credentials one URL names; ValueError naming what is wrong."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise _bad(url, f"scheme must be one of {', '.join(sorted(_SCHEMES))}")
    topology, tls = _SCHEMES[scheme]
    options = dict(parse_qsl(parts.query))
    retry_seconds = _retry_seconds(url, options, topology)
    if topology == "standalone":
        rest = [(k, v) for k, v in parse_qsl(parts.query) if k != "retry_seconds"]
        plain = urlunsplit(parts._replace(query=urlencode(rest)))
        return RedisTarget("standalone", url=plain, tls=tls, retry_seconds=retry_seconds)
    unknown = sorted(set(options) - set(_OWN_OPTIONS))
    if unknown:
        raise _bad(url, f"unknown option {unknown[0]!r}")
    username, password = _credentials(parts.netloc)
    path = [p for p in parts.path.split("/") if p]
    service, db = "", 0
    if topology == "sentinel":
        if not path or len(path) > 2:
            raise _bad(url, "a Sentinel URL names its service: redis+sentinel://h:p/SERVICE[/db]")
        service = unquote(path[0])
        if len(path) == 2:
            if not path[1].isdigit():
                raise _bad(url, "the database after the service must be a number")
            db = int(path[1])
    elif path and path != ["0"]:
        raise _bad(url, "a Redis Cluster has database 0 only")
    return RedisTarget(
        topology,
        nodes=_nodes(url, parts.netloc),
        service=service,
        db=db,
        username=username,
        password=password,
        tls=tls,
        tls_options={k: v for k, v in options.items() if k in _TLS_OPTIONS},
        sentinel_username=options.get("sentinel_username"),
        sentinel_password=options.get("sentinel_password"),
        retry_seconds=retry_seconds,
    )


def redacted_redis_url(url: str) -> str:
    """The URL with its passwords (the userinfo's, ``sentinel_password``) replaced, for
    messages and logs."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        userinfo, hosts = parts.netloc.rsplit("@", 1)
        user = userinfo.partition(":")[0] if ":" in userinfo else ""
        parts = parts._replace(netloc=f"{user}:***@{hosts}")
    options = parse_qsl(parts.query, keep_blank_values=True)
    if any(name in _SECRET_OPTIONS for name, _value in options):
        hidden = [(n, "***" if n in _SECRET_OPTIONS else v) for n, v in options]
        parts = parts._replace(query=urlencode(hidden, safe="*/"))
    return urlunsplit(parts)


def _retryable(error: Exception) -> bool:
    # A refused password or user is a ConnectionError to redis-py, but no wait mends it:
    # retrying only delayed the answer (a minute on a Cluster's 30 s budget).
    return not isinstance(error, AuthenticationError | AuthorizationError)


def _retry(seconds: float) -> Retry:
    return Retry(
        ExponentialBackoff(cap=0.5, base=0.02),
        max(1, int(seconds / 0.25)),
        is_retryable=_retryable,
    )


# A primary that was demoted answers writes with READONLY until clients follow the new one;
# retrying (after the client rediscovers the primary) rides that out too.
_RETRY_ON = [ConnectionError, TimeoutError, BusyLoadingError, ReadOnlyError]


def _tls_kwargs(target: RedisTarget) -> dict[str, Any]:
    if not target.tls:
        return {}
    return {"ssl": True, **target.tls_options}


def _client_kwargs(target: RedisTarget, max_connections: int) -> dict[str, Any]:
    """What every data-node connection gets, whichever topology."""
    return {
        "username": target.username,
        "password": target.password,
        "decode_responses": False,
        "max_connections": max_connections,
        "socket_connect_timeout": 2,
        "socket_keepalive": True,
        "retry": _retry(target.retry_seconds),
        "retry_on_error": list(_RETRY_ON),
        **_tls_kwargs(target),
    }


#: Connections to each Cluster node beyond the calls a client lets run at once: the slot
#: map's refreshes and a pub/sub subscription take their own.
_CLUSTER_SPARE_CONNECTIONS = 8
#: Set while a task runs a call that holds one of its Cluster client's turns: the calls it
#: makes inside (a pipeline's redirected commands) run on that turn.
_HOLDS_TURN: ContextVar[bool] = ContextVar("usher_cluster_turn", default=False)


class _QueuingCluster(RedisCluster):
    """A Cluster client whose calls wait their turn when ``calls`` are already running (as
    the standalone pool's wait for a free connection, up to POOL_WAIT_SECONDS): redis-py's
    Cluster client fails a call at once (MaxConnectionsError) when a node has no free
    connection left, so a burst (a hundred streams starting at once) failed calls that
    the other topologies queue."""

    def __init__(self, *args: Any, calls: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._turns = asyncio.Semaphore(calls)

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        if _HOLDS_TURN.get():
            yield
            return
        try:
            async with asyncio.timeout(POOL_WAIT_SECONDS):
                await self._turns.acquire()
        except TimeoutError:
            raise ConnectionError(
                f"no free Redis Cluster connection in {POOL_WAIT_SECONDS:.0f} s"
            ) from None
        holding = _HOLDS_TURN.set(True)
        try:
            yield
        finally:
            _HOLDS_TURN.reset(holding)
            self._turns.release()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.turn():
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)  # refused as redis-py refuses it
        # (redis-py's stubs leave an attribute of its pipelines abstract: they are built so.)
        return _QueuingPipeline(self, transaction)  # type: ignore[abstract]


class _QueuingPipeline(ClusterPipeline):
    """A pipeline of ``_QueuingCluster``: its execution takes one turn."""

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        client = cast(_QueuingCluster, self.cluster_client)
        async with client.turn():
            return await super().execute(raise_on_error, allow_redirections)


def _cluster(target: RedisTarget, max_connections: int) -> RedisCluster:
    return _QueuingCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
        calls=max_connections,
        **_client_kwargs(target, max_connections + _CLUSTER_SPARE_CONNECTIONS),
    )


class _BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """The primary Sentinel names, with the standalone pool's waiting for a free connection
    instead of failing a burst."""


def _sentinel(target: RedisTarget, max_connections: int) -> aioredis.Redis:
    sentinel = Sentinel(
        list(target.nodes),
        sentinel_kwargs={
            "username": target.sentinel_username,
            "password": target.sentinel_password,
            "socket_connect_timeout": 1,
            "socket_timeout": 1,
            **_tls_kwargs(target),
        },
        socket_connect_timeout=2,
    )
    return cast(
        aioredis.Redis,
        sentinel.master_for(
            target.service,
            connection_pool_class=_BlockingSentinelPool,
            timeout=POOL_WAIT_SECONDS,
            db=target.db,
            health_check_interval=10,
            **_client_kwargs(target, max_connections),
        ),
    )


def connect_redis(
    url: str, retry_seconds: float | None = None, max_connections: int = 64
) -> aioredis.Redis:
    """A client for the topology ``url`` names that rides out a restart or failover by
    retrying (``retry_seconds``, else the URL's ``retry_seconds``, else the topology's
    default).

    Retrying is safe for Usher's writes because each script is idempotent in the request id
    it is given (a repeated enqueue finds the request already there). The standalone pool
    blocks (up to POOL_WAIT_SECONDS) rather than failing when every connection is busy, so a
    burst of calls queues instead of erroring.

    A Cluster client is returned typed as ``Redis``: it offers the same commands, pipelines
    (split per node), scripts and pub/sub; code that must differ asks ``is_cluster``.
    """
    target = parse_redis_url(url)
    if retry_seconds is not None:
        target = replace(target, retry_seconds=retry_seconds)
    if target.topology == "cluster":
        return cast(aioredis.Redis, _cluster(target, max_connections))
    if target.topology == "sentinel":
        return _sentinel(target, max_connections)
    pool = aioredis.BlockingConnectionPool.from_url(
        target.url,
        max_connections=max_connections,
        timeout=POOL_WAIT_SECONDS,
        decode_responses=False,
        health_check_interval=10,
        socket_connect_timeout=2,
        socket_keepalive=True,
        retry=_retry(target.retry_seconds),
        retry_on_error=list(_RETRY_ON),
    )
    # The scheme chose the class (TCP, TLS, Unix socket): the same, with the lighter packing.
    pool.connection_class = _fast_packing(pool.connection_class)
    return aioredis.Redis.from_pool(pool)


class _FastPacking:
    """Commands packed by hiredis from the arguments as given: redis-py first passes each
    argument through its encoder (five type checks in Python, about a microsecond each; a
    script call of a dozen arguments costs more to pack than to send). hiredis writes str
    (UTF-8), bytes, int and float (as repr) as redis-py's encoder does; anything else
    (memoryview, bool, a command name with a space) takes redis-py's own path, as does an
    argument hiredis refuses, so errors are redis-py's too."""

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        if isinstance(first, str) and " " not in first:
            with contextlib.suppress(Exception):  # redis-py's path packs it or says why not
                return [hiredis.pack_command(args)]
        return cast(list[bytes], super().pack_command(*args))  # type: ignore[misc]


_FAST: dict[type, type] = {}


def _fast_packing(connection_class: type) -> type:
    fast = _FAST.get(connection_class)
    if fast is None:
        fast = _FAST[connection_class] = type(
            f"Fast{connection_class.__name__}", (_FastPacking, connection_class), {}
        )
    return fast


def is_cluster(client: object) -> bool:
    """Whether ``client`` talks to a Redis Cluster (keys of different slots cannot share a
    command, a transaction or a blocking read)."""
    return isinstance(client, RedisCluster)
