"""Usher's container image run for real (scripts/image_test.sh builds it first).

    python -m usher.testing.container_stack --image localhost/usher:image-test \\
        --redis-image localhost/usher-base-redis:bookworm --work .image-test

Redis (with deploy/k8s/base/config/redis.conf), an Ollama emulator, the Pool, Scheduler,
Notifier and gateway run as podman containers on one network, named like the Kubernetes
Services, so deploy/k8s/base/config/usher.env is their environment unchanged, in
production mode with secrets from deploy/tools/make_secrets.py. Read-only root filesystems,
uid 10001, no capabilities, as in the manifests.

Requests go through the gateway (POST /queue/requests, then /api/generate and
/v1/chat/completions) while the Scheduler and then Redis are killed with SIGKILL and
started again; every request the gateway accepted (202 with an id) must end COMPLETED.
Figures are printed as JSON lines; the exit code is non-zero when anything accepted was
lost. Containers, network and volume are removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from usher.testing.processes import free_port

__all__ = ["Stack", "main", "run"]

REPO = Path(__file__).resolve().parents[2]
#: podman on these machines: runc (crun fails on the cgroup setup), explicit ulimits.
PODMAN = ("podman", "--runtime", "runc")
ULIMITS = ("--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096")
HARDENED: tuple[str, ...] = ("--read-only", "--tmpfs", "/tmp:rw,size=64m", "--cap-drop", "ALL")
HARDENED += ("--security-opt", "no-new-privileges", "--user", "10001:10001")
#: Host name (= the Kubernetes Service name usher.env uses) -> the last octet of its address.
#: Names resolve through --add-host, so containers and networks can carry a per-run suffix
#: and two runs never collide.
HOSTS = {
    "usher-redis": 10,
    "ollama": 11,
    "usher-pool": 12,
    "usher-scheduler": 13,
    "usher-notifier": 14,
    "usher-gateway": 15,
}
#: The services usher.env addresses through their headless Services.
HEADLESS = ("usher-pool", "usher-scheduler", "usher-notifier")
MODEL = "llama3.2:1b"


def mac_of(ip: str) -> str:
    """A fixed MAC per address: a restarted container keeps both, so its peers' neighbour
    caches stay right (a new MAC behind an old IP goes unanswered for ~40 s until they
    expire, which is not what a restart looks like in Kubernetes, where the pod is new)."""
    return "02:42:" + ":".join(f"{int(part):02x}" for part in ip.split("."))


def podman(*args: str, check: bool = True) -> str:
    done = subprocess.run([*PODMAN, *args], capture_output=True, text=True)
    if check and done.returncode:
        raise RuntimeError(f"podman {' '.join(args[:3])}: {done.stderr.strip()}")
    return done.stdout.strip()


def figure(name: str, value: float | int, unit: str) -> None:
    print(json.dumps({"figure": name, "value": round(value, 3), "unit": unit}), flush=True)


@dataclass
class Stack:
    image: str
    redis_image: str
    work: Path
    gateway_port: int = field(default_factory=free_port)
    env_files: list[Path] = field(default_factory=list)
    run_id: int = field(default_factory=os.getpid)

    @property
    def network(self) -> str:
        return f"usher-image-test-{self.run_id}"

    @property
    def volume(self) -> str:
        return f"usher-image-test-redis-{self.run_id}"

    def ip(self, host: str) -> str:
        return f"10.89.{20 + self.run_id % 200}.{HOSTS[host]}"

    def container(self, host: str) -> str:
        return f"{host}-{self.run_id}"

    def hosts(self) -> list[str]:
        """Every Service name usher.env uses, the headless ones (``dns:///usher-pool-headless``,
        for client-side balancing) resolving to the same container."""
        names = [(host, host) for host in HOSTS]
        names += [(f"{host}-headless", host) for host in HEADLESS]
        return [arg for name, host in names for arg in ("--add-host", f"{name}:{self.ip(host)}")]

    def secrets(self) -> None:
        """Fresh secrets, as an overlay gets them (the same tool, the same files)."""
        folder = self.work / "stack"
        subprocess.run(
            [sys.executable, str(REPO / "deploy/tools/make_secrets.py"), str(folder), "--force"],
            check=True,
            capture_output=True,
        )
        self.env_files = [
            REPO / "deploy/k8s/base/config/usher.env",
            folder / "secrets/usher-secrets.env",
            folder / "secrets/usher-redis.env",
        ]

    def password(self) -> str:
        for line in self.env_files[2].read_text().splitlines():
            if line.startswith("REDIS_PASSWORD="):
                return line.partition("=")[2]
        raise RuntimeError("no REDIS_PASSWORD")

    def _run(self, name: str, image: str, args: Sequence[str], options: Sequence[str] = ()) -> None:
        podman(
            "run", "--detach", "--name", self.container(name), "--network", self.network,
            "--ip", self.ip(name), "--mac-address", mac_of(self.ip(name)),
            *self.hosts(), *ULIMITS, *options, image, *args,
        )  # fmt: skip

    def start_redis(self) -> None:
        conf = REPO / "deploy/k8s/base/config/redis.conf"
        self._run(
            "usher-redis",
            self.redis_image,
            # Not /etc/redis: Debian's package keeps that directory to its own redis user.
            ["redis-server", "/usr/local/etc/redis.conf", "--requirepass", self.password()],
            [
                "--user", "10999:10999", "--read-only", "--cap-drop", "ALL",
                "-v", f"{conf}:/usr/local/etc/redis.conf:ro",
                "-v", f"{self.volume}:/data:U",
            ],
        )  # fmt: skip

    def start_usher(self, name: str, module: str, extra: Sequence[str] = ()) -> None:
        env = [arg for f in self.env_files for arg in ("--env-file", str(f))]
        self._run(name, self.image, [module], [*HARDENED, *env, *extra])

    def up(self) -> None:
        self.down()
        podman(
            "network",
            "create",
            "--subnet",
            self.ip("usher-redis").rpartition(".")[0] + ".0/24",
            self.network,
        )
        self.secrets()
        self.start_redis()
        self._run(
            "ollama",
            self.image,
            ["usher.emulator", "--host", "0.0.0.0", "--port", "11434", "--models", MODEL,
             "--tokens-per-second", "40"],
            HARDENED,
        )  # fmt: skip
        fleet = ("-e", "USHER_INSTANCES=ollama=http://ollama:11434;parallel=4")
        self.start_usher("usher-pool", "services.pool", fleet)
        # Leases of a killed Scheduler expire after this (usher.env's 30 s, shortened).
        self.start_usher("usher-scheduler", "services.scheduler", ("-e", "USHER_LEASE_SECONDS=5"))
        self.start_usher("usher-notifier", "services.notifier")
        self.start_usher(
            "usher-gateway", "services.gateway", ("-p", f"127.0.0.1:{self.gateway_port}:8080")
        )

    def down(self) -> None:
        for host in HOSTS:
            podman("rm", "--force", "--time", "0", self.container(host), check=False)
        podman("network", "rm", "--force", self.network, check=False)
        podman("volume", "rm", "--force", self.volume, check=False)

    def logs(self, name: str) -> str:
        return podman("logs", "--tail", "30", self.container(name), check=False)


async def wait_ready(client: httpx.AsyncClient, timeout: float = 120.0) -> float:
    """Seconds until the gateway's /health answers 200 (Scheduler, Notifier, Pool SERVING)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if (await client.get("/health", timeout=3)).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError("the gateway's /health never answered 200")


@dataclass
class Tally:
    accepted: list[str] = field(default_factory=list)
    refused: int = 0


async def submit(client: httpx.AsyncClient, tally: Tally, i: int) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"image test request {i}"}],
        "max_tokens": 48,
    }
    try:
        reply = await client.post("/queue/requests", json=body, timeout=10)
    except httpx.TransportError:
        tally.refused += 1
        return
    if reply.status_code == 202:
        tally.accepted.append(reply.json()["id"])
    else:  # refused while a dependency is down: never accepted, so nothing to lose
        tally.refused += 1


async def outcome(client: httpx.AsyncClient, request_id: str, deadline: float) -> str:
    while time.monotonic() < deadline:
        try:
            reply = await client.get(f"/queue/requests/{request_id}", timeout=5)
            state = str(reply.json().get("state")) if reply.status_code == 200 else "?"
        except (httpx.TransportError, ValueError):
            state = "?"
        if state in ("completed", "failed", "cancelled", "expired"):
            return state
        await asyncio.sleep(0.5)
    return "timeout"


async def kill_and_restart(
    client: httpx.AsyncClient, stack: Stack, name: str
) -> tuple[float, float, str]:
    """SIGKILL a container and start it again: seconds until a Submit is accepted, until
    the gateway's /health is 200 again, and the id of that first accepted request."""
    podman("kill", "--signal", "KILL", stack.container(name))
    started = time.monotonic()
    podman("start", stack.container(name))
    tally = Tally()
    while not tally.accepted and time.monotonic() - started < 120:
        await submit(client, tally, -1)
        await asyncio.sleep(0.1)
    if not tally.accepted:
        raise TimeoutError(f"no Submit was accepted after {name} restarted")
    accepted = time.monotonic() - started
    await wait_ready(client)
    return accepted, time.monotonic() - started, tally.accepted[0]


async def traffic(stack: Stack, requests: int) -> bool:
    headers = {"Authorization": f"Bearer {admin_token(stack)}"}
    base = f"http://127.0.0.1:{stack.gateway_port}"
    async with httpx.AsyncClient(base_url=base, headers=headers) as client:
        figure(
            "stack start: containers started -> gateway /health 200", await wait_ready(client), "s"
        )
        generate = await client.post(
            "/api/generate", json={"model": MODEL, "prompt": "hello", "stream": False}, timeout=60
        )
        chat = await client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            timeout=60,
        )
        print(
            json.dumps({"ollama_generate": generate.status_code, "openai_chat": chat.status_code})
        )
        tally = Tally()
        pending = set()
        for i in range(requests):
            pending.add(asyncio.ensure_future(submit(client, tally, i)))
            await asyncio.sleep(0.05)
            victim = {requests // 3: "usher-scheduler", 2 * requests // 3: "usher-redis"}.get(i)
            if victim:
                await asyncio.gather(*pending)
                accepted, healthy, request_id = await kill_and_restart(client, stack, victim)
                tally.accepted.append(request_id)
                figure(f"{victim} SIGKILL+start -> a Submit accepted", accepted, "s")
                figure(f"{victim} SIGKILL+start -> gateway /health 200", healthy, "s")
        await asyncio.gather(*pending)
        deadline = time.monotonic() + 240
        states = await asyncio.gather(*(outcome(client, r, deadline) for r in tally.accepted))
    counts = {s: states.count(s) for s in sorted(set(states))}
    print(json.dumps({"accepted": len(tally.accepted), "refused": tally.refused, "ended": counts}))
    return (
        generate.status_code == 200
        and chat.status_code == 200
        and counts == {"completed": len(tally.accepted)}
    )


def admin_token(stack: Stack) -> str:
    for line in stack.env_files[1].read_text().splitlines():
        if line.startswith("USHER_API_TOKENS="):
            return line.partition("=")[2].split(",")[0].partition("=")[0]
    raise RuntimeError("no USHER_API_TOKENS")


def run(image: str, redis_image: str, work: Path, requests: int = 60, keep: bool = False) -> bool:
    stack = Stack(image, redis_image, work)
    started = time.monotonic()
    try:
        stack.up()
        figure("podman run of 6 containers", time.monotonic() - started, "s")
        ok = asyncio.run(traffic(stack, requests))
    except Exception:
        for host in HOSTS:
            print(f"--- {host}\n{stack.logs(host)}", file=sys.stderr)
        raise
    finally:
        if not keep:
            stack.down()
    figure("image test total", time.monotonic() - started, "s")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--image", required=True)
    parser.add_argument("--redis-image", required=True)
    parser.add_argument("--work", type=Path, default=REPO / ".image-test")
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--keep", action="store_true", help="leave the containers running")
    args = parser.parse_args(argv)
    ok = run(args.image, args.redis_image, args.work, args.requests, args.keep)
    print("image test: " + ("nothing accepted was lost" if ok else "FAILED"), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
