"""Chaos with the whole system running, for the chaos benchmark and the end-to-end test.

A steady stream of requests goes through the SDK while the Scheduler, the Pool, the
Notifier, a model server and Redis (AOF, appendfsync always) are SIGKILLed and brought back
in turn at random intervals. With gateways in the stack, every other request goes through
one of them over HTTP instead (an idempotency key each, the next gateway on a refused
connection or a 5xx, as a load balancer in front of them would), and with two or more a
gateway can be a victim too. Then the accounting: accepted vs finished (nothing may be
lost), how many terminal events each request's log holds (exactly one: nothing finished
twice), events delivered twice to watchers (none, through the SDK, on the Notifier's own
streams and on the gateways' event streams) and how long each outage lasted::

    report = await run_chaos(160, rate=8.0, kill_each_at_least=1)
    assert report.lost == 0 and report.duplicates == 0 and not report.not_finished_once
"""

from __future__ import annotations

import asyncio
import itertools
import random
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
import grpc
import grpc.aio

from clients.aio import AsyncUsherClient
from clients.errors import UsherError
from clients.retry import RetryPolicy
from usher import keys
from usher.balancing import channel_target
from usher.connections import connect_redis
from usher.ids import event_id_key
from usher.queue.reads import QueueReader
from usher.testing.redis_topologies import LocalRedisCluster, LocalSentinel
from usher.testing.sse import sse_events
from usher.testing.stack import LocalStack, StackConfig
from usher.v1 import notifier_pb2, notifier_pb2_grpc

__all__ = [
    "GATEWAY",
    "MODEL",
    "VICTIMS",
    "ChaosReport",
    "Kill",
    "chaos_config",
    "run_chaos",
    "terminal_events",
]

MODEL = "llama3.2:1b"
#: What can be killed, in the words the report uses (the default victims).
VICTIMS = ("scheduler", "pool", "notifier", "redis", "model server")
#: A gateway replica: a victim too when the stack runs two or more.
GATEWAY = "gateway"
TOKEN = "alice-token"
_TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "EXPIRED")
_TERMINAL_EVENTS = {b"completed", b"failed", b"cancelled", b"expired"}
_TERMINAL_KINDS = {
    notifier_pb2.UPDATE_KIND_COMPLETED,
    notifier_pb2.UPDATE_KIND_FAILED,
    notifier_pb2.UPDATE_KIND_CANCELLED,
    notifier_pb2.UPDATE_KIND_EXPIRED,
}
#: A plain Watch stream that ends with one of these is resumed from the last event seen.
_RESUMABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
}


def chaos_config(
    state_dir: str = "", tokens_per_second: int = 400, max_attempts: int | None = None
) -> StackConfig:
    """Two model servers, each its own (killable) process, generating ``tokens_per_second``
    each request (10 to 40 tokens an answer); Redis with appendfsync always; short leases
    so the work of a killed Scheduler comes back quickly. Every kill that catches a request
    running costs it one of its ``max_attempts`` (None: the Scheduler's default, 3)."""
    attempts = {} if max_attempts is None else {"USHER_MAX_ATTEMPTS": str(max_attempts)}
    return StackConfig(
        state_dir=state_dir,
        redis_appendfsync="always",
        model_server_processes=2,
        emulator_args=(
            "--tokens-per-second",
            str(tokens_per_second),
            "--load-time",
            "0.05",
            "--parallel",
            "4",
            "--output-tokens",
            "10:40",
        ),
        instance_options=";parallel=4",
        scheduler_env={
            "USHER_LEASE_SECONDS": "2",
            "USHER_REAP_INTERVAL_SECONDS": "0.1",
            "USHER_QUEUE_MAX_SIZE": "100000",
            "USHER_DISPATCH_CONCURRENCY": "16",
            **attempts,
        },
        pool_env={"USHER_POOL_SLOT_LEASE_SECONDS": "3"},
    )


@dataclass(frozen=True)
class Kill:
    victim: str
    #: Seconds since the run began.
    at: float
    #: From the kill until a client call went through again.
    recovery: float
    #: The victim's process was running when the SIGKILL came (not already dead).
    was_running: bool


@dataclass
class ChaosReport:
    #: Request ids in the order they were accepted, and when (seconds since the run began).
    accepted: list[str] = field(default_factory=list)
    accepted_at: list[float] = field(default_factory=list)
    #: Request id → its final state ("COMPLETED", ...), for those that finished.
    final: dict[str, str] = field(default_factory=dict)
    #: Request id → how many times it was started (more than 1: a kill caught it running).
    attempts: dict[str, int] = field(default_factory=dict)
    #: When each completed request finished, seconds since the run began.
    finished_at: list[float] = field(default_factory=list)
    #: Request id → terminal events (completed, failed, ...) in its event log in Redis.
    terminal_events: dict[str, int] = field(default_factory=dict)
    #: Watched request → event ids the SDK's watch delivered, in order.
    watched: dict[str, list[str]] = field(default_factory=dict)
    #: Watched request → event ids sent on plain Notifier streams (resumed from the last
    #: event id seen, without the SDK's filter of ids already seen).
    streamed: dict[str, list[str]] = field(default_factory=dict)
    #: Watched request (submitted through a gateway) → event ids the gateways' event
    #: streams (Server-Sent Events) sent, resumed by hand with Last-Event-ID on the next
    #: gateway when one broke.
    relayed: dict[str, list[str]] = field(default_factory=dict)
    #: Requests submitted through a gateway (the others through the SDK).
    through_gateway: set[str] = field(default_factory=set)
    #: Watched request → how many times its plain stream broke and was resumed.
    resumed: Counter[str] = field(default_factory=Counter)
    #: "sdk <id>" / "stream <id>" → how the watch ended: the last update's kind, or the error.
    watch_endings: dict[str, str] = field(default_factory=dict)
    kills: list[Kill] = field(default_factory=list)
    seconds: float = 0.0
    #: Where the services' logs and Redis's data are.
    state_dir: str = ""

    @property
    def outcomes(self) -> Counter[str]:
        return Counter(self.final.values())

    @property
    def completed(self) -> int:
        return self.outcomes["COMPLETED"]

    @property
    def lost(self) -> int:
        """Accepted requests that never finished."""
        return len(self.accepted) - len(self.final)

    @property
    def retried(self) -> int:
        """Requests that ran more than once (a kill caught them running)."""
        return sum(1 for n in self.attempts.values() if n > 1)

    @property
    def not_finished_once(self) -> dict[str, int]:
        """Requests whose event log holds other than exactly one terminal event."""
        return {rid: n for rid, n in self.terminal_events.items() if n != 1}

    @property
    def duplicates(self) -> int:
        """Events the SDK's watch delivered more than once."""
        return sum(len(ids) - len(set(ids)) for ids in self.watched.values())

    @property
    def notifier_duplicates(self) -> int:
        """Events the Notifier sent more than once on one watcher's (resumed) streams."""
        return sum(len(ids) - len(set(ids)) for ids in self.streamed.values())

    @property
    def gateway_duplicates(self) -> int:
        """Events the gateways sent more than once on one watcher's (resumed) streams."""
        return sum(len(ids) - len(set(ids)) for ids in self.relayed.values())

    @property
    def watches_not_completed(self) -> dict[str, str]:
        """Watches that did not end on the COMPLETED update, with how they ended."""
        return {w: how for w, how in self.watch_endings.items() if how != "COMPLETED"}

    def killed(self) -> Counter[str]:
        """Victim → how many times it was SIGKILLed while running."""
        return Counter(kill.victim for kill in self.kills if kill.was_running)

    def recoveries(self) -> dict[str, list[float]]:
        """Victim → its recovery times, seconds."""
        out: dict[str, list[float]] = defaultdict(list)
        for kill in self.kills:
            out[kill.victim].append(kill.recovery)
        return dict(sorted(out.items()))


@dataclass(frozen=True)
class ChaosPlan:
    """How a chaos run goes (see ``run_chaos``)."""

    requests: int
    rate: float
    victims: Sequence[str] = VICTIMS
    seed: int = 3
    watch_every: int = 20
    pause: tuple[float, float] = (1.5, 3.5)
    model_server_downtime: float = 2.0
    kill_each_at_least: int = 0
    settle_timeout: float = 180.0
    watch_timeout: float = 60.0


async def run_chaos(
    requests: int,
    rate: float,
    victims: Sequence[str] = VICTIMS,
    *,
    config: StackConfig | None = None,
    seed: int = 3,
    watch_every: int = 20,
    pause: tuple[float, float] = (1.5, 3.5),
    model_server_downtime: float = 2.0,
    kill_each_at_least: int = 0,
    settle_timeout: float = 180.0,
    watch_timeout: float = 60.0,
) -> ChaosReport:
    """Submit ``requests`` prompts (about ``rate`` a second) while ``victims`` are killed in
    turn (a shuffled order, repeated) after pauses drawn from ``pause``; a model server stays
    down ``model_server_downtime`` seconds, the others restart at once. Every
    ``watch_every``-th request is watched twice: through the SDK and on a plain stream.

    Killing stops when the last request is accepted, or, with ``kill_each_at_least``, once
    every victim was killed that many times. Then waits up to ``settle_timeout`` seconds for
    every accepted request to finish and ``watch_timeout`` for the watches to end."""
    config = config or chaos_config()
    known = (*VICTIMS, GATEWAY)
    unknown = set(victims) - set(known)
    if unknown or not victims:
        raise ValueError(f"victims must be some of {known}, got {list(victims)}")
    if GATEWAY in victims and (not config.gateway or config.gateway_replicas < 2):
        # One gateway killed is an outage for its clients, not a replica's loss.
        raise ValueError("a gateway is a victim only among two or more (gateway_replicas)")
    plan = ChaosPlan(
        requests,
        rate,
        victims,
        seed,
        watch_every,
        pause,
        model_server_downtime,
        kill_each_at_least,
        settle_timeout,
        watch_timeout,
    )
    with LocalStack(config) as stack:
        run = _ChaosRun(plan, stack)
        try:
            await run.run()
        finally:
            await run.close()
    return run.report


class _ChaosRun:
    """One chaos run against a running stack: the traffic, the watchers, the kills."""

    def __init__(self, plan: ChaosPlan, stack: LocalStack) -> None:
        self.plan = plan
        self.stack = stack
        self.rng = random.Random(plan.seed)
        self.report = ChaosReport(state_dir=str(stack.state_dir))
        # Every replica of each service, calls round robin (as deployed clients do).
        self.client = AsyncUsherClient(
            stack.scheduler_addresses,
            stack.notifier_addresses,
            token=TOKEN,
            retry=RetryPolicy(max_total_wait=120.0, max_attempts=200, max_backoff=1.0),
        )
        target, balancing = channel_target(stack.notifier_addresses)
        self.plain = grpc.aio.insecure_channel(
            target,
            options=[
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 1000),
                *balancing,
            ],
        )
        self.notifier = notifier_pb2_grpc.NotifierServiceStub(self.plain)
        self.http = aiohttp.ClientSession(
            headers={"authorization": f"Bearer {TOKEN}"},
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=2, sock_read=30),
        )
        self.done_submitting = asyncio.Event()
        self.watchers: list[asyncio.Task[None]] = []
        self._relayed_kinds: dict[str, str] = {}
        self.began = time.monotonic()
        self.began_wall = time.time()

    async def run(self) -> None:
        self.began, self.began_wall = time.monotonic(), time.time()
        await asyncio.gather(self.submit_all(), self.chaos())
        await self.settle()
        if self.watchers:
            await asyncio.wait(self.watchers, timeout=self.plan.watch_timeout)
        self.report.seconds = time.monotonic() - self.began
        self.report.terminal_events = await terminal_events(
            self.stack.redis_url, self.report.accepted
        )

    async def close(self) -> None:
        for task in self.watchers:
            task.cancel()
        await asyncio.gather(*self.watchers, return_exceptions=True)
        await self.client.close()
        await self.plain.close()
        await self.http.close()

    async def submit_all(self) -> None:
        report = self.report
        gateways = bool(self.stack.gateways)
        for i in range(self.plan.requests):
            through_gateway = gateways and i % 2 == 1
            if through_gateway:
                request_id = await self.submit_through_gateway(i)
                report.through_gateway.add(request_id)
            else:
                request_id = (await self.client.submit(MODEL, f"chaos {i}")).request.id
            report.accepted.append(request_id)
            report.accepted_at.append(time.monotonic() - self.began)
            # The first of each watch_every through the SDK, the second through a gateway.
            if i % self.plan.watch_every == 0 or (
                through_gateway and i % self.plan.watch_every == 1
            ):
                watches = [("sdk", self.watch), ("stream", self.stream)]
                if through_gateway:
                    watches.append(("gateway", self.relay))
                for kind, how in watches:
                    key = f"{kind} {request_id}"
                    self.watchers.append(asyncio.create_task(self.ending(key, how(request_id))))
            await asyncio.sleep(1 / self.plan.rate)
        self.done_submitting.set()

    async def submit_through_gateway(self, i: int) -> str:
        """POST /queue/requests with an idempotency key, to the gateways in turn from the
        i-th: a refused connection or a 5xx moves to the next (so a retry after a gateway
        died mid-answer finds the request it queued, never a second one)."""
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"chaos {i}"}]}
        headers = {"Idempotency-Key": f"chaos-{self.plan.seed}-{i}"}
        for attempt in itertools.count():
            urls = self.stack.gateway_urls
            url = urls[(i + attempt) % len(urls)]
            try:
                async with self.http.post(
                    f"{url}/queue/requests", json=body, headers=headers
                ) as reply:
                    if reply.status == 202:
                        return str((await reply.json())["id"])
                    if reply.status < 500 and reply.status != 429:
                        raise RuntimeError(f"{url} refused: {reply.status} {await reply.text()}")
            except (aiohttp.ClientError, TimeoutError):
                pass  # that gateway is down (or died answering): the next one
            await asyncio.sleep(min(1.0, 0.05 * 2 ** min(attempt, 5)))
        raise AssertionError("unreachable")

    async def relay(self, request_id: str) -> str:
        """A gateway's event stream (SSE) to the end, resumed with Last-Event-ID on the
        next gateway when it breaks, as a browser's EventSource behind a load balancer."""
        seen = self.report.relayed.setdefault(request_id, [])
        for attempt in itertools.count():
            urls = self.stack.gateway_urls
            url = f"{urls[attempt % len(urls)]}/queue/requests/{request_id}/events"
            headers = {"Last-Event-ID": seen[-1]} if seen else {}
            try:
                async with self.http.get(url, headers=headers) as response:
                    if response.status == 200:
                        async for event in sse_events(response):
                            if event.event == "end":
                                ending = event.json() if event.data else {}
                                if not ending:
                                    return self._last_relayed_kind(request_id)
                                break  # the gateway lost its upstream: resume
                            if event.id:
                                seen.append(event.id)
                                self._relayed_kinds[request_id] = event.json().get("kind", "")
            except (aiohttp.ClientError, TimeoutError, ValueError):
                pass  # the gateway died mid-stream
            self.report.resumed[request_id] += 1
            await asyncio.sleep(0.2)
        raise AssertionError("unreachable")

    def _last_relayed_kind(self, request_id: str) -> str:
        return self._relayed_kinds.get(request_id, "no update").upper()

    async def ending(self, key: str, watching: Coroutine[Any, Any, str]) -> None:
        self.report.watch_endings[key] = "still watching when the run ended"
        self.report.watch_endings[key] = await watching

    async def watch(self, request_id: str) -> str:
        seen = self.report.watched.setdefault(request_id, [])
        last = "no update"
        try:
            async for update in self.client.watch(request_id):
                last = update.kind.name
                if update.event_id:
                    seen.append(update.event_id)
        except UsherError as exc:
            return f"{type(exc).__name__}: {exc.message}"
        return last

    async def stream(self, request_id: str) -> str:
        """The Notifier's Watch without the SDK: resumed by hand from the last id seen,
        so an event the Notifier sends twice is counted, not filtered out."""
        seen = self.report.streamed.setdefault(request_id, [])
        last_kind = "no update"
        while last_kind not in _TERMINAL_STATES:
            last = max(seen, key=lambda e: event_id_key(e) or (0, 0), default="")
            try:
                last_kind = await self._stream_once(request_id, last, seen)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _RESUMABLE:
                    return f"{exc.code().name}: {exc.details()}"
            if last_kind not in _TERMINAL_STATES:
                self.report.resumed[request_id] += 1  # the stream broke or ended early
                await asyncio.sleep(0.2)
        return last_kind

    async def _stream_once(self, request_id: str, last: str, seen: list[str]) -> str:
        last_kind = "no update"
        async for response in self.notifier.Watch(
            notifier_pb2.WatchRequest(id=request_id, last_event_id=last),
            metadata=(("authorization", f"Bearer {TOKEN}"),),
            timeout=30,
        ):
            last_kind = notifier_pb2.UpdateKind.Name(response.kind).removeprefix("UPDATE_KIND_")
            if response.event_id:
                seen.append(response.event_id)
            if response.kind in _TERMINAL_KINDS:
                break
        return last_kind

    async def outage(self, victim: str) -> None:
        stack = self.stack
        started = time.monotonic()
        if victim == "model server":
            # A model server dies for a while, then comes back on its port.
            index = self.rng.randrange(len(stack.model_servers))
            was_running = stack.model_servers[index].returncode is None
            stack.model_servers[index].kill()
            await asyncio.sleep(self.plan.model_server_downtime)
            await asyncio.to_thread(stack.restart_model_server, index)
        else:
            process, kill, restart = _service(stack, victim, self.rng)
            was_running = process is not None and process.poll() is None
            kill()
            await asyncio.to_thread(restart)
        # Recovered when a client call goes through again (a gateway: through every one,
        # its clients having gone to the others meanwhile).
        while True:
            if await self.answers(victim):
                break
            await asyncio.sleep(0.05)
        self.report.kills.append(
            Kill(victim, started - self.began, time.monotonic() - started, was_running)
        )

    async def answers(self, victim: str) -> bool:
        last = self.report.accepted[-1]
        if victim == GATEWAY:
            for url in self.stack.gateway_urls:
                try:
                    async with self.http.get(f"{url}/queue/requests/{last}") as reply:
                        if reply.status != 200:
                            return False
                except (aiohttp.ClientError, TimeoutError):
                    return False
            return True
        try:
            await self.client.get(last)
        except UsherError:
            return False
        return True

    async def chaos(self) -> None:
        # Every kind of victim in turn, in a shuffled order, at random intervals.
        victims = list(self.plan.victims)
        order = self.rng.sample(victims, len(victims))
        for n in itertools.count():
            await asyncio.sleep(self.rng.uniform(*self.plan.pause))
            killed = Counter(kill.victim for kill in self.report.kills)
            enough = all(killed[v] >= self.plan.kill_each_at_least for v in victims)
            if self.done_submitting.is_set() and enough:
                return
            if self.report.accepted:
                await self.outage(order[n % len(order)])

    async def settle(self) -> None:
        """Wait (bounded) until every accepted request has finished, noting how."""
        report = self.report
        deadline = time.monotonic() + self.plan.settle_timeout
        while len(report.final) < len(report.accepted) and time.monotonic() < deadline:
            for request_id in report.accepted:
                if request_id not in report.final:
                    request = await self.client.get(request_id)
                    if request.state.name in _TERMINAL_STATES:
                        report.final[request_id] = request.state.name
                        report.attempts[request_id] = request.attempts
                        if request.state.name == "COMPLETED" and request.finished_at:
                            report.finished_at.append(
                                request.finished_at.timestamp() - self.began_wall
                            )
            await asyncio.sleep(0.5)


def _service(
    stack: LocalStack, victim: str, rng: random.Random
) -> tuple[subprocess.Popen[bytes] | None, Callable[[], None], Callable[[], object]]:
    """A service's process now (one replica, drawn, when there are several), how to SIGKILL
    it and how to start it again (same port). Redis on a Cluster or Sentinel: a primary,
    restarted (as a replica) once its replica has taken over."""
    if victim == "scheduler":
        i = rng.randrange(len(stack.schedulers))
        return (
            stack.schedulers[i].process,
            stack.schedulers[i].kill,
            lambda: stack.start_scheduler(i),
        )
    if victim == "notifier":
        i = rng.randrange(len(stack.notifiers))
        return stack.notifiers[i].process, stack.notifiers[i].kill, lambda: stack.start_notifier(i)
    if victim == "pool":
        i = rng.randrange(len(stack.pools))
        return stack.pools[i].process, stack.pools[i].kill, lambda: stack.start_pool(i)
    if victim == GATEWAY:
        i = rng.randrange(len(stack.gateways))
        return (
            stack.gateways[i].process,
            stack.gateways[i].kill,
            lambda: stack.start_gateway(None, i),
        )
    cluster = stack.redis_topology
    if isinstance(cluster, LocalRedisCluster):
        node = cluster.node(rng.choice(cluster.primary_ports()))

        def come_back() -> None:
            cluster.wait_failover()
            node.start()

        return node.process, node.kill, come_back
    sentinel = stack.redis_topology
    if isinstance(sentinel, LocalSentinel):
        old_port = sentinel.primary_port()
        primary = next(server for server in sentinel.servers if server.port == old_port)

        def rejoin() -> None:
            sentinel.wait_failover(old_port)
            primary.start()

        return primary.process, primary.kill, rejoin
    assert stack.redis is not None
    return stack.redis.process, stack.redis.kill, stack.redis.start


async def terminal_events(redis_url: str, request_ids: Sequence[str]) -> dict[str, int]:
    """Request id → terminal events written for it (read from Redis): in its own event log,
    or on its model's stream for one that never had a log of its own (a result-only request
    written running at once: its record is 'quiet')."""
    redis = connect_redis(redis_url)
    try:
        models = await QueueReader(redis).models_of(request_ids)
        out: dict[str, int] = {}
        quiet: dict[str, list[str]] = defaultdict(list)
        for request_id, model in zip(request_ids, models, strict=True):
            out[request_id] = 0
            if model is None:
                continue
            mk = keys.ModelKeys(model)
            if await redis.hget(mk.request(request_id), "quiet") == b"1":
                quiet[model].append(request_id)
                continue
            entries = cast(
                list[tuple[bytes, dict[bytes, bytes]]],
                await redis.xrange(mk.request_events(request_id)),
            )
            out[request_id] = sum(
                1 for _eid, fields in entries if fields.get(b"type") in _TERMINAL_EVENTS
            )
        for model, ids in quiet.items():
            wanted = {i.encode() for i in ids}
            entries = cast(
                list[tuple[bytes, dict[bytes, bytes]]],
                await redis.xrange(keys.ModelKeys(model).events),
            )
            for _eid, fields in entries:
                if fields.get(b"id") in wanted and fields.get(b"type") in _TERMINAL_EVENTS:
                    out[fields[b"id"].decode()] += 1
        return out
    finally:
        await redis.aclose()
