"""Replicas share the load: 2 Schedulers, 2 Pools, 2 Notifiers and 2 gateways on one Redis.
Each gateway is given every Scheduler, Notifier and Pool address and each Scheduler every
Pool address (comma lists): calls go round robin, so every replica of each kind serves a
fair part of its kind's calls (counted by usher_grpc_server_calls_total on each replica).
Then one replica of each kind is killed in turn under load, and nothing is lost."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import httpx
import pytest

from bench.chaos import GATEWAY, chaos_config, run_chaos, terminal_events
from usher.testing.stack import LocalStack, StackConfig
from usher.v1 import request_pb2, scheduler_pb2, scheduler_pb2_grpc

pytestmark = pytest.mark.slow
REQUESTS = 400
AUTH = {"authorization": "Bearer alice-token"}
_CALLS = re.compile(r'^usher_grpc_server_calls_total\{method="([^"]+)"\} ([0-9.e+]+)$', re.M)


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    config = StackConfig(
        emulator_args=(
            "--fleet",
            "2",
            "--tokens-per-second",
            "0",
            "--load-time",
            "0.01",
            "--parallel",
            "8",
            "--output-tokens",
            "4:8",
        ),
        instance_options=";parallel=8",
        scheduler_replicas=2,
        notifier_replicas=2,
        pool_replicas=2,
        gateway=True,
        gateway_replicas=2,
        metrics=True,
    )
    with LocalStack(config) as running:
        yield running


async def calls_of(url: str) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(url)).text
    return {method: float(count) for method, count in _CALLS.findall(text)}


async def test_every_replica_of_each_kind_serves_a_fair_part(stack: LocalStack) -> None:
    before = {name: await calls_of(url) for name, url in stack.metrics_urls.items()}
    served = dict.fromkeys(stack.gateway_urls, 0)
    limit = asyncio.Semaphore(16)

    async def one(i: int, client: httpx.AsyncClient) -> None:
        url = stack.gateway_urls[i % len(stack.gateway_urls)]  # clients spread over gateways
        # Half the answers streamed: those are always watched on a Notifier (an answer sent
        # whole often comes with the Submit, the Notifier never asked).
        stream = i % 4 >= 2
        async with limit:
            reply = await client.post(
                f"{url}/api/generate",
                json={"model": "llama3.2:1b", "prompt": f"share {i}", "stream": stream},
                headers=AUTH,
            )
        assert reply.status_code == 200, reply.text
        assert json.loads(reply.text.splitlines()[-1])["done"] is True
        served[url] += 1

    async with httpx.AsyncClient(timeout=60) as client:
        await asyncio.gather(*(one(i, client) for i in range(REQUESTS)))
    after = {name: await calls_of(url) for name, url in stack.metrics_urls.items()}
    shares: dict[str, dict[str, float]] = {}
    for name in after:
        kind = name.split("-")[0]
        calls = sum(after[name].values()) - sum(before[name].values())
        shares.setdefault(kind, {})[name] = calls
    print({kind: dict(replicas) for kind, replicas in shares.items()}, served)
    for kind, replicas in shares.items():
        assert len(replicas) == 2, kind
        total = sum(replicas.values())
        assert total >= (REQUESTS // 2 if kind == "notifier" else REQUESTS), (kind, replicas)
        for name, calls in replicas.items():
            assert calls >= 0.25 * total, f"{name} served {calls} of {kind}'s {total} calls"
    assert all(count >= 0.25 * REQUESTS for count in served.values())


CHAOS_REQUESTS = 200
GATEWAY_CHAOS_REQUESTS = 150


@pytest.mark.timeout(600)
async def test_one_replica_of_each_kind_killed_in_turn_loses_nothing(tmp_path: Path) -> None:
    """2 Schedulers, 2 Pools, 2 Notifiers, 2 gateways; one replica of each kind SIGKILLed in
    turn (and brought back) under load: every accepted request completes exactly once and
    no watcher sees an event twice. Half the requests go through the gateways (their
    clients retry on the other gateway with the same idempotency key, as a load balancer
    would) and are watched on the gateways' event streams too."""
    config = replace(
        chaos_config(str(tmp_path), tokens_per_second=50, max_attempts=50),
        scheduler_replicas=2,
        notifier_replicas=2,
        pool_replicas=2,
        gateway=True,
        gateway_replicas=2,
    )
    victims = ("scheduler", "pool", "notifier", GATEWAY)
    report = await run_chaos(
        CHAOS_REQUESTS,
        rate=8.0,
        victims=victims,
        config=config,
        watch_every=4,
        pause=(1.0, 2.0),
        kill_each_at_least=1,
        settle_timeout=240.0,
        watch_timeout=120.0,
    )
    logs = f"(services' logs in {report.state_dir})"
    print(
        f"{len(report.accepted)} accepted ({len(report.through_gateway)} through a gateway), "
        f"{dict(report.outcomes)}, kills {dict(report.killed())}, "
        f"gateway streams resumed {sum(report.resumed[r] for r in report.relayed)}"
    )
    assert all(report.killed()[v] >= 1 for v in victims)
    assert len(report.accepted) == CHAOS_REQUESTS
    assert len(set(report.accepted)) == CHAOS_REQUESTS  # none queued twice
    assert len(report.through_gateway) == CHAOS_REQUESTS // 2
    assert report.lost == 0, logs
    assert report.completed == len(report.accepted), f"{dict(report.outcomes)} {logs}"
    assert report.not_finished_once == {}, logs
    assert report.duplicates == 0, logs
    assert report.notifier_duplicates == 0, logs
    assert report.relayed and report.gateway_duplicates == 0, logs
    assert report.watches_not_completed == {}, logs


async def test_a_gateway_killed_under_load_loses_no_accepted_request(stack: LocalStack) -> None:
    """Clients post to the two gateways (POST /queue/requests, an idempotency key each,
    the other gateway on a refused connection); one gateway is SIGKILLed and restarted
    mid-load: every request is accepted once and completes once."""
    accepted: dict[int, str] = {}

    async def one(i: int, client: httpx.AsyncClient) -> None:
        body = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": f"gw {i}"}]}
        headers = {**AUTH, "Idempotency-Key": f"gateway-chaos-{i}"}
        for attempt in range(100):
            url = stack.gateway_urls[(i + attempt) % len(stack.gateway_urls)]
            try:
                reply = await client.post(f"{url}/queue/requests", json=body, headers=headers)
                if reply.status_code == 202:
                    accepted[i] = reply.json()["id"]
                    return
            except httpx.HTTPError:
                pass  # that gateway is down: the next one
            await asyncio.sleep(0.1)

    async with httpx.AsyncClient(timeout=10) as client:
        tasks = []
        for i in range(GATEWAY_CHAOS_REQUESTS):
            tasks.append(asyncio.create_task(one(i, client)))
            if i == GATEWAY_CHAOS_REQUESTS // 3:
                stack.gateways[0].kill()
            if i == GATEWAY_CHAOS_REQUESTS // 2:
                await asyncio.to_thread(stack.start_gateway, None, 0)
            await asyncio.sleep(0.05)
        await asyncio.gather(*tasks)
    assert len(accepted) == GATEWAY_CHAOS_REQUESTS
    assert len(set(accepted.values())) == GATEWAY_CHAOS_REQUESTS  # none queued twice
    ids = list(accepted.values())
    async with grpc.aio.insecure_channel(stack.scheduler_address) as channel:
        scheduler = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        for _ in range(240):
            replies = await asyncio.gather(
                *(
                    scheduler.Get(scheduler_pb2.GetRequest(id=i), metadata=tuple(AUTH.items()))
                    for i in ids
                )
            )
            if all(r.request.state == request_pb2.REQUEST_STATE_COMPLETED for r in replies):
                break
            await asyncio.sleep(0.5)
    assert all(r.request.state == request_pb2.REQUEST_STATE_COMPLETED for r in replies)
    terminal = await terminal_events(stack.redis_url, ids)
    assert set(terminal.values()) == {1}, "a request finished other than once"
