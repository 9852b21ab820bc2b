"""``usher up`` — the entry point ``make up`` runs — started as a user starts it: a
subprocess of its own, with no settings but a state directory and a gateway port."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # psutil ships no stubs
import pytest

from usher.testing.processes import free_port

REPO = Path(__file__).resolve().parents[2]
#: What a user's shell might export that would change the fleet ``usher up`` runs.
FLEET_SETTINGS = (
    "OLLAMA_HOST",
    "USHER_INSTANCES",
    "USHER_POOL_CONFIG",
    "REDIS_URL",
    "USHER_REDIS_URL",
)


def up_env(state_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in FLEET_SETTINGS}
    env.update(
        USHER_STATE_DIR=str(state_dir),
        USHER_GATEWAY_LISTEN=f"127.0.0.1:{free_port()}",
        COLUMNS="200",
        **extra,
    )
    return env


@dataclass
class RunningUp:
    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.output)
            if found:
                return found
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in the output of usher up:\n{self.output}")

    @property
    def gateway(self) -> str:
        return self.wait_for(r"Gateway\s+(http://\S+)", 1).group(1)

    def descendants(self) -> list[psutil.Process]:
        children: list[psutil.Process] = psutil.Process(self.process.pid).children(recursive=True)
        return children

    def stop(self) -> list[psutil.Process]:
        """Ctrl-C (SIGINT), wait for the exit; the processes it had started."""
        started = self.descendants()
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=30)
        return started


def start_up(args: Sequence[str], env: dict[str, str], ready_timeout: float) -> RunningUp:
    process = subprocess.Popen(
        [sys.executable, "-m", "clients.cli", "up", *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    running = RunningUp(process)
    assert process.stdout is not None
    stdout = process.stdout
    threading.Thread(
        target=lambda: running.lines.extend(iter(stdout.readline, "")), daemon=True
    ).start()
    try:
        running.wait_for(r"Press Ctrl-C", ready_timeout)
    except BaseException:
        process.kill()
        raise
    return running


def assert_all_gone(processes: Sequence[psutil.Process], timeout: float = 10) -> None:
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"


@contextlib.contextmanager
def serving(args: Sequence[str], env: dict[str, str], ready_timeout: float) -> Iterator[RunningUp]:
    """``usher up`` from ready to Ctrl-C; on the way out, nothing it started may be left
    and it must exit 0."""
    running = start_up(args, env, ready_timeout)
    try:
        yield running
    finally:
        if running.process.poll() is None:
            assert_all_gone(running.stop())
        assert running.process.returncode == 0, running.output[-3000:]


@pytest.fixture(scope="package", params=["serve", "trio"])
def up(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningUp]:
    """``usher up`` on its emulated fleet, for the whole package, in both shapes: all in
    one process (``usher serve``, the default) and the trio (``--trio``)."""
    state = tmp_path_factory.mktemp("up")
    shape = ["--trio"] if request.param == "trio" else []
    with serving(
        ["--tokens-per-second", "400", *shape], up_env(state), ready_timeout=60
    ) as running:
        yield running
