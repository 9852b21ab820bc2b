"""The peers a user would pick instead of Usher, run beside it in the overhead scenario:
LiteLLM's proxy (one worker, the emulator's OpenAI-compatible API as its upstream) and
ollama-herd (its router and its node agent beside the emulator, ``OLLAMA_NUM_PARALLEL``
set, telemetry off).

Each is installed at a pinned version into its own throwaway venv under
``$XDG_CACHE_HOME/usher/bench-peers/`` (never the project's, outside the repository; reused
by later runs once complete, deleted freely). A peer
that cannot be installed or started is reported with the reason, and the scenario goes on.
ollama-herd always advertises itself over mDNS, so it runs with its own emulator in a
loopback-only network namespace (``ip netns``), and its load comes from a child process
in the same namespace (``python -m bench.load``)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import httpx

from bench.load import Load
from usher.testing.processes import free_port

__all__ = ["HERD", "LITELLM", "PeerUnavailable", "herd", "litellm", "load_in_namespace"]

LITELLM = "litellm[proxy]==1.106.2"
HERD = "ollama-herd==0.11.4"
#: The emulator behind herd: the overhead scenario's (zero delay, 8 tokens per answer).
EMULATOR_ARGS = ("--fleet", "1", "--instant", "--parallel", "64", "--output-tokens", "8:8")
READY_SECONDS = 60.0
NAMESPACE_LOOPBACK = "127.0.0.1"


class PeerUnavailable(Exception):
    """A peer could not be installed or started: the reason, for the summary."""


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(line for line in text.strip().splitlines()[-lines:] if line)[:400]


def peer_venv(requirement: str) -> Path:
    """A venv holding ``requirement`` (installed now unless an earlier run completed it)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    name = requirement.replace("[", "_").replace("]", "").replace("==", "-")
    home = cache / "usher" / "bench-peers" / name
    done = home / ".installed"
    if done.exists():
        return home
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(home)], check=True)
    pip = subprocess.run(
        [str(home / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", requirement],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if pip.returncode != 0:
        raise PeerUnavailable(f"pip install {requirement} failed: {_tail(pip.stderr)}")
    done.touch()
    return home


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PeerUnavailable(f"exited {process.returncode}: {_tail(log.read_text())}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code < 500:
                return
        time.sleep(0.2)
    raise PeerUnavailable(f"not ready in {READY_SECONDS:.0f} s: {_tail(log.read_text())}")


def _stop(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def litellm(upstream: str, model: str) -> Iterator[tuple[str, str, dict[str, int]]]:
    """LiteLLM's proxy (one worker) in front of ``upstream``'s OpenAI-compatible API: its
    URL, its master key and process ids."""
    home = peer_venv(LITELLM)
    work = Path(tempfile.mkdtemp(prefix="usher-litellm-"))
    key = f"sk-{secrets.token_urlsafe(24)}"
    config = work / "config.yaml"
    config.write_text(
        json.dumps(
            {
                "model_list": [
                    {
                        "model_name": model,
                        "litellm_params": {
                            "model": f"openai/{model}",
                            "api_base": f"{upstream}/v1",
                            "api_key": "none",
                        },
                    }
                ],
                "litellm_settings": {"telemetry": False, "drop_params": True},
                "general_settings": {"master_key": key},
            }
        )
    )
    port = free_port()
    log = work / "litellm.log"
    env = {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(home / "bin" / "litellm"),
                "--config",
                str(config),
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
                "--num_workers",
                "1",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(f"{url}/health/liveliness", process, log)
        yield url, key, {"litellm": process.pid}
    finally:
        _stop([process])


def _namespace() -> str:
    name = f"usher-bench-{os.getpid()}"
    try:
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
        subprocess.run(
            ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        raise PeerUnavailable(
            f"no loopback-only network namespace for its mDNS ({exc}; {detail.decode()[:200]})"
        ) from None
    return name


def _in_namespace(
    namespace: str, argv: Sequence[str], env: Mapping[str, str], log: Path
) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            ["ip", "netns", "exec", namespace, *argv],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _herd_ready(namespace: str, url: str, node: subprocess.Popen[bytes], log: Path) -> None:
    """Until the router lists the emulator's models (its node agent has reported)."""
    deadline = time.monotonic() + READY_SECONDS
    probe = f"import httpx; print(len(httpx.get('{url}/api/tags').json()['models']))"
    while time.monotonic() < deadline:
        if node.poll() is not None:
            raise PeerUnavailable(f"node agent exited {node.returncode}: {_tail(log.read_text())}")
        found = subprocess.run(
            ["ip", "netns", "exec", namespace, sys.executable, "-c", probe],
            capture_output=True,
            text=True,
        )
        if found.returncode == 0 and found.stdout.strip() not in ("", "0"):
            return
        time.sleep(0.5)
    raise PeerUnavailable(f"its router listed no model in {READY_SECONDS:.0f} s")


@contextlib.contextmanager
def herd() -> Iterator[tuple[str, str, dict[str, int]]]:
    """ollama-herd's router and node agent beside their own emulator, in a loopback-only
    network namespace: the namespace, the router's URL there, and the process ids."""
    home = peer_venv(HERD)
    namespace = _namespace()
    # Its SQLite trace store commits per request: on tmpfs, so the disk's fsync doesn't
    # bound it (the bench measures proxies, not disks; Usher's Redis fsyncs its AOF once a second,
    # off the request path).
    work = Path(tempfile.mkdtemp(prefix="usher-herd-", dir="/dev/shm"))
    emulator_port, router_port = free_port(), free_port()
    quiet = {
        "HOME": str(work),  # its state and logs stay in the throwaway directory
        "FLEET_TELEMETRY": "false",
        "FLEET_NODE_TELEMETRY": "false",
        "OLLAMA_NUM_PARALLEL": "64",
        # Its --log-level doesn't reach these: by default it writes DEBUG lines to a JSONL
        # file and INFO lines through rich to the console, which cost it most of its CPU.
        "FLEET_LOG_LEVEL": "WARNING",
        "FLEET_CONSOLE_LOG_LEVEL": "WARNING",
    }
    router_url = f"http://{NAMESPACE_LOOPBACK}:{router_port}"
    processes: list[subprocess.Popen[bytes]] = []
    try:
        processes.append(
            _in_namespace(
                namespace,
                [
                    sys.executable,
                    "-m",
                    "usher.emulator",
                    "--port",
                    str(emulator_port),
                    *list(EMULATOR_ARGS),
                ],
                {},
                work / "emulator.log",
            )
        )
        processes.append(
            _in_namespace(
                namespace,
                [
                    str(home / "bin" / "herd"),
                    "--host",
                    NAMESPACE_LOOPBACK,
                    "--port",
                    str(router_port),
                    "--log-level",
                    "WARNING",
                ],
                quiet,
                work / "router.log",
            )
        )
        processes.append(
            _in_namespace(
                namespace,
                [
                    str(home / "bin" / "herd-node"),
                    "--ollama-host",
                    f"http://{NAMESPACE_LOOPBACK}:{emulator_port}",
                    "--router-url",
                    router_url,
                    "--log-level",
                    "WARNING",
                ],
                quiet,
                work / "node.log",
            )
        )
        _herd_ready(namespace, router_url, processes[2], work / "node.log")
        pids = {"herd-router": processes[1].pid, "herd-node": processes[2].pid}
        yield namespace, router_url, pids
    finally:
        _stop(processes)
        subprocess.run(["ip", "netns", "del", namespace], check=False, capture_output=True)


def load_in_namespace(
    namespace: str,
    url: str,
    concurrency: int,
    seconds: float,
    pids: Mapping[str, int],
    stream: bool = False,
) -> Load:
    """A closed loop of OpenAI chat calls to ``url`` from inside ``namespace`` (streamed
    answers with ``stream``)."""
    argv = [sys.executable, "-m", "bench.load", *(["--stream"] if stream else [])]
    argv += [url, str(concurrency), str(seconds)]
    argv += [f"{name}={pid}" for name, pid in pids.items()]
    child = subprocess.run(
        ["ip", "netns", "exec", namespace, *argv],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        cwd=Path(__file__).resolve().parents[1],
    )
    if child.returncode != 0:
        raise PeerUnavailable(f"its load generator failed: {_tail(child.stderr)}")
    return Load(**json.loads(child.stdout.strip().splitlines()[-1]))
