"""Service processes for tests: started as real subprocesses, killed with real signals."""

from __future__ import annotations

import errno
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

__all__ = ["ServiceProcess", "free_port", "listens", "port_is_free", "wait_for_port"]


#: Where free_port looks: below the kernel's ephemeral range, which outgoing connections
#: take their local ports from. A port picked inside it (bind to 0) could be taken by any
#: client socket between the pick and the server's bind ("Address already in use": a
#: stack's service failed to start and every test on it failed).
_PORTS_FROM = 20_000
#: Ports handed out by this process, never handed out again by it.
_handed: set[int] = set()


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            return int(ranges.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def free_port(pair_offset: int = 0) -> int:
    """A loopback port free now, outside the ephemeral range, not handed out before here
    (random, so processes picking at once rarely meet; bind-checked). ``pair_offset``: the
    port that far above it must be free and outside the range too (a Redis Cluster node's
    bus port)."""
    end = _ephemeral_start() - pair_offset
    for _ in range(1000):
        port = random.randrange(_PORTS_FROM, end) if end > _PORTS_FROM + 1000 else 0
        pair = port + pair_offset if pair_offset else None
        if port in _handed or pair in _handed or (pair is not None and not port_is_free(pair)):
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            picked: int = sock.getsockname()[1]
        _handed.update({picked} if pair is None else {picked, pair})
        return picked
    raise RuntimeError("no free loopback port found")


def port_is_free(port: int) -> bool:
    """Whether nothing listens on (or holds) ``port`` on loopback now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_for_port(
    port: int, timeout: float = 15.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"process exited with {process.returncode} before listening on {port}"
            )
        if listens(port):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


def listens(port: int) -> bool:
    """Whether something listens on ``port`` on 127.0.0.1. The probe connects from
    127.0.0.2 where it can (Linux routes all of 127/8): from 127.0.0.1, a connect to a
    port in the kernel's ephemeral range that nothing listens on yet can be given that very
    port as its own and meet itself (TCP self-connect). It then looks like a listener, and
    holds the port the service is about to bind: ``usher up``'s Pool failed to start on
    its usual port 50052 that way while its stack was reported ready."""
    for source in (("127.0.0.2", 0), None):
        try:
            with socket.create_connection(
                ("127.0.0.1", port), timeout=0.5, source_address=source
            ) as probe:
                return bool(probe.getsockname() != probe.getpeername())
        except OSError as exc:
            if source is not None and exc.errno == errno.EADDRNOTAVAIL:
                continue  # no 127.0.0.2 on this machine (macOS): from 127.0.0.1
            return False
    return False


#: How long a service may take to listen. A second when the machine is idle; the 8 processes
#: of a multi-replica stack starting side by side beside other suites on 2 cores took over 20.
READY_SECONDS = 60.0


class ServiceProcess:
    """``python -m <module>`` with the given environment, listening on ``port``."""

    def __init__(
        self,
        module: str,
        port: int,
        env: Mapping[str, str],
        args: Sequence[str] = (),
        log_path: str | None = None,
        cwd: str | None = None,
    ) -> None:
        self.module = module
        self.port = port
        self.env = {**os.environ, **env}
        self.args = list(args)
        self.log_path = log_path
        #: Where it starts: ``python -m`` imports ``module`` from there first.
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = READY_SECONDS) -> ServiceProcess:
        return self.launch().ready(timeout)

    def launch(self) -> ServiceProcess:
        """Start the process without waiting (start several, then ``ready`` each)."""
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args],
            env=self.env,
            stdout=out,
            stderr=out,
            cwd=self.cwd,
        )
        return self

    def ready(self, timeout: float = READY_SECONDS) -> ServiceProcess:
        """Wait until the launched process listens on its port."""
        assert self.process is not None, "launch() first"
        try:
            wait_for_port(self.port, timeout, self.process)
        except (TimeoutError, RuntimeError) as exc:
            raise type(exc)(f"{self.module}: {exc}{self._log_tail()}") from None
        return self

    def _log_tail(self, lines: int = 5) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, "rb") as log:
            tail = log.read()[-4000:].decode(errors="replace").strip().splitlines()[-lines:]
        return "; its log ends: " + " | ".join(tail) if tail else ""

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up (as in a node crash)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def signal_stop(self) -> None:
        """SIGTERM without waiting (``terminate`` then waits for the exit)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def terminate(self, timeout: float = 15.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.terminate()
