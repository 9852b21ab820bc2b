"""Running emulators for tests, demos and benchmarks.

* ``EmulatorFleet``: several instances in the current event loop, on free ports.
* ``EmulatorProcess``: one CLI process (or a ``--fleet``) in a subprocess, so a
  test can SIGKILL it and see what a real crash looks like from outside.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from usher.emulator.config import EmulatorConfig
from usher.emulator.server import EmulatorServer

__all__ = ["EmulatorFleet", "EmulatorProcess"]


class EmulatorFleet:
    """Several in-process instances::

        async with EmulatorFleet([EmulatorConfig(num_parallel=2)] * 3) as fleet:
            fleet.urls          # ["http://127.0.0.1:40123", ...]
            fleet[0].stats      # EmulatorStats of the first instance
            await fleet[1].crash()

    Each config is deep-copied, so passing the same object N times is fine.
    An int builds that many copies of ``config`` (default ``EmulatorConfig()``).
    """

    def __init__(
        self,
        configs: Sequence[EmulatorConfig] | int = 1,
        *,
        config: EmulatorConfig | None = None,
    ) -> None:
        if isinstance(configs, int):
            base = config if config is not None else EmulatorConfig()
            configs = [base] * configs
        self.servers: list[EmulatorServer] = [EmulatorServer(copy.deepcopy(c)) for c in configs]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    async def start(self) -> list[str]:
        try:
            for server in self.servers:
                await server.start()
        except BaseException:
            await self.stop()
            raise
        return self.urls

    async def stop(self) -> None:
        await asyncio.gather(*(s.stop() for s in self.servers), return_exceptions=True)

    def __getitem__(self, index: int) -> EmulatorServer:
        return self.servers[index]

    def __len__(self) -> int:
        return len(self.servers)

    def __iter__(self) -> Iterator[EmulatorServer]:
        return iter(self.servers)

    async def __aenter__(self) -> EmulatorFleet:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class EmulatorProcess:
    """``python -m usher.emulator`` in a child process.

    ``args`` are extra CLI flags; ``config`` is written to a temporary JSON file and
    passed as ``--config``. ``start()`` waits until the child prints its URL(s)::

        with EmulatorProcess(["--models", "qwen2.5:0.5b"]) as proc:
            proc.url
            proc.kill()   # SIGKILL: connections drop, nothing answers
    """

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        config: EmulatorConfig | None = None,
        python: str = sys.executable,
        env: dict[str, str] | None = None,
        startup_timeout: float = 20.0,
    ) -> None:
        self.args = list(args)
        self.config = config
        self.python = python
        self.env = env
        self.startup_timeout = startup_timeout
        self.urls: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._config_path: Path | None = None

    @property
    def expected_instances(self) -> int:
        if "--fleet" in self.args:
            return int(self.args[self.args.index("--fleet") + 1])
        for arg in self.args:
            if arg.startswith("--fleet="):
                return int(arg.split("=", 1)[1])
        return 1

    @property
    def url(self) -> str:
        if not self.urls:
            raise RuntimeError("emulator process not started")
        return self.urls[0]

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("emulator process not started")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def start(self) -> list[str]:
        """Spawn and block until every instance printed its URL."""
        cmd = [self.python, "-m", "usher.emulator"]
        if "--port" not in self.args and not any(a.startswith("--port=") for a in self.args):
            cmd += ["--port", "0"]
        if self.config is not None:
            fd, name = tempfile.mkstemp(prefix="usher-emulator-", suffix=".json")
            with os.fdopen(fd, "w") as fh:
                json.dump(self.config.to_dict(), fh)
            self._config_path = Path(name)
            cmd += ["--config", name]
        cmd += self.args
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env)
        assert self._proc.stdout is not None
        deadline = time.monotonic() + self.startup_timeout
        buffer = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            while len(self.urls) < self.expected_instances:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sel.select(remaining):
                    self.kill()
                    raise TimeoutError("emulator process did not report its URL in time")
                chunk = os.read(self._proc.stdout.fileno(), 4096)
                if not chunk:
                    code = self._proc.wait()
                    raise RuntimeError(f"emulator process exited early with status {code}")
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    text = line.decode().strip()
                    if text.startswith("http://"):
                        self.urls.append(text)
        return self.urls

    async def astart(self) -> list[str]:
        return await asyncio.to_thread(self.start)

    def kill(self) -> None:
        """SIGKILL: the harshest crash (no cleanup, sockets reset by the kernel)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()

    def terminate(self, timeout: float = 5.0) -> int | None:
        """SIGTERM and wait (graceful shutdown)."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self._proc.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self._proc is None:
            raise RuntimeError("emulator process not started")
        return self._proc.wait(timeout)

    def stop(self) -> None:
        self.terminate()
        if self._proc is not None and self._proc.stdout is not None:
            self._proc.stdout.close()
        if self._config_path is not None:
            self._config_path.unlink(missing_ok=True)
            self._config_path = None

    def __enter__(self) -> EmulatorProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> EmulatorProcess:
        await self.astart()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)
