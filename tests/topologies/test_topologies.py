"""The whole flow (Submit → dispatch → Pool → emulator → Notifier watch) on a Redis Cluster
and on Sentinel, over twelve models spread across slots; then a primary SIGKILLed under load,
its replica promoted, the stack recovering, and with WAIT on, no accepted request lost."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import redis

from tests.topologies.conftest import MODELS, TopologyServers, emulator_args
from usher.testing.redis_topologies import LocalRedisCluster, LocalSentinel
from usher.testing.stack import LocalStack, StackConfig
from usher.v1 import (
    notifier_pb2,
    notifier_pb2_grpc,
    request_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

pytestmark = pytest.mark.slow
ALICE = (("authorization", "Bearer alice-token"),)
TERMINAL = {
    request_pb2.REQUEST_STATE_COMPLETED,
    request_pb2.REQUEST_STATE_FAILED,
    request_pb2.REQUEST_STATE_CANCELLED,
    request_pb2.REQUEST_STATE_EXPIRED,
}


def stack_on(
    servers: TopologyServers,
    tmp: Path,
    scheduler_env: dict[str, str] | None = None,
    tokens_per_second: int = 300,
) -> LocalStack:
    return LocalStack(
        StackConfig(
            state_dir=str(tmp / "stack"),
            redis_url=servers.url,
            emulator_args=emulator_args(tokens_per_second=tokens_per_second),
            instance_options=";parallel=4;max_loaded=16",
            scheduler_env={
                "USHER_DISPATCH_CONCURRENCY": "16",
                "USHER_MAX_ATTEMPTS": "20",
                **(scheduler_env or {}),
            },
        )
    )


@contextlib.asynccontextmanager
async def stubs(
    stack: LocalStack,
) -> AsyncIterator[
    tuple[scheduler_pb2_grpc.SchedulerServiceAsyncStub, notifier_pb2_grpc.NotifierServiceAsyncStub]
]:
    async with (
        grpc.aio.insecure_channel(stack.scheduler_address) as scheduler,
        grpc.aio.insecure_channel(stack.notifier_address) as notifier,
    ):
        yield (
            scheduler_pb2_grpc.SchedulerServiceStub(scheduler),
            notifier_pb2_grpc.NotifierServiceStub(notifier),
        )


def submit_request(model: str, prompt: str) -> scheduler_pb2.SubmitRequest:
    return scheduler_pb2.SubmitRequest(
        model=model, generate=request_pb2.GenerateInput(prompt=prompt)
    )


async def watch_to_end(
    notifier: notifier_pb2_grpc.NotifierServiceAsyncStub, request_id: str
) -> list[notifier_pb2.WatchResponse]:
    return [
        update
        async for update in notifier.Watch(
            notifier_pb2.WatchRequest(id=request_id), metadata=ALICE, timeout=90
        )
    ]


async def every_model_watched(
    scheduler: scheduler_pb2_grpc.SchedulerServiceAsyncStub,
    notifier: notifier_pb2_grpc.NotifierServiceAsyncStub,
) -> list[list[notifier_pb2.WatchResponse]]:
    """One request per model, each watched to its end (in MODELS' order)."""
    submitted = [
        await scheduler.Submit(submit_request(m, f"hello {m}"), metadata=ALICE) for m in MODELS
    ]
    return await asyncio.gather(*(watch_to_end(notifier, s.request.id) for s in submitted))


def primaries_of_models(servers: LocalRedisCluster) -> set[int]:
    """The primaries (ports) whose slots hold the models' keys."""
    client = redis.RedisCluster(host="127.0.0.1", port=servers.nodes[0].port)
    try:
        return {
            client.get_node_from_key(f"usher:{{{m}}}:queue").port  # type: ignore[no-untyped-call]
            for m in MODELS
        }
    finally:
        client.close()


@pytest.mark.timeout(300)
async def test_the_whole_flow_runs_on_twelve_models_across_slots(
    topology: TopologyServers, tmp_path: Path
) -> None:
    if isinstance(topology, LocalRedisCluster):
        assert len(primaries_of_models(topology)) == 3  # every primary holds some model
    with stack_on(topology, tmp_path) as stack:
        async with stubs(stack) as (scheduler, notifier):
            watched = await every_model_watched(scheduler, notifier)
            for model, updates in zip(MODELS, watched, strict=True):
                final = updates[-1]
                assert final.kind == notifier_pb2.UPDATE_KIND_COMPLETED, (model, final)
                assert final.request.model == model
                assert final.request.result.text == "".join(u.text_delta for u in updates)
                event_ids = [u.event_id for u in updates if u.event_id]
                assert len(event_ids) == len(set(event_ids))
            # Get and List read keys of every slot (the listing spans the models).
            listed = await scheduler.List(scheduler_pb2.ListRequest(page_size=50), metadata=ALICE)
            assert {r.model for r in listed.requests} == set(MODELS)
            assert {r.state for r in listed.requests} == {request_pb2.REQUEST_STATE_COMPLETED}


class Load:
    """Submits round-robin over the models at a steady rate, as a careful client does: each
    request with its own idempotency key, retried while the answer is UNAVAILABLE (Redis
    failing over, or WAIT finding no replica yet). Keeps what was accepted."""

    def __init__(self, scheduler: scheduler_pb2_grpc.SchedulerServiceAsyncStub) -> None:
        self.scheduler = scheduler
        self.accepted: list[str] = []
        self.retried = 0

    async def one(self, i: int) -> None:
        request = submit_request(MODELS[i % len(MODELS)], f"load {i}")
        request.idempotency_key = f"load-{i}"
        deadline = time.monotonic() + 90
        while True:
            try:
                reply = await self.scheduler.Submit(request, metadata=ALICE, timeout=30)
            except grpc.aio.AioRpcError as error:
                retryable = error.code() in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                )
                if not retryable or time.monotonic() > deadline:
                    return
                self.retried += 1
                await asyncio.sleep(0.5)
                continue
            self.accepted.append(reply.request.id)
            return

    async def run(self, count: int, rate: float) -> None:
        tasks = []
        for i in range(count):
            tasks.append(asyncio.create_task(self.one(i)))
            await asyncio.sleep(1 / rate)
        await asyncio.gather(*tasks)


async def final_states(
    scheduler: scheduler_pb2_grpc.SchedulerServiceAsyncStub, ids: list[str], timeout: float
) -> dict[str, int]:
    """Each request's state once it is terminal (or its last one, or -1 when it is gone)."""
    states: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    pending = list(ids)
    while pending and time.monotonic() < deadline:
        still = []
        for request_id in pending:
            try:
                got = await scheduler.Get(
                    scheduler_pb2.GetRequest(id=request_id), metadata=ALICE, timeout=10
                )
                states[request_id] = got.request.state
            except grpc.aio.AioRpcError as error:
                states[request_id] = -1 if error.code() == grpc.StatusCode.NOT_FOUND else -2
            if states[request_id] not in TERMINAL:
                still.append(request_id)
        pending = still
        if pending:
            await asyncio.sleep(0.5)
    return states


@pytest.mark.timeout(400)
async def test_a_primary_killed_under_load_loses_no_accepted_request_with_wait(
    topology: TopologyServers, tmp_path: Path
) -> None:
    env = {"USHER_REDIS_WAIT_REPLICAS": "1", "USHER_REDIS_WAIT_TIMEOUT_MS": "2000"}
    with stack_on(topology, tmp_path, env) as stack:
        async with stubs(stack) as (scheduler, _notifier):
            load = Load(scheduler)
            running = asyncio.create_task(load.run(count=120, rate=15))
            await asyncio.sleep(3)  # about 45 submitted, many still running
            if isinstance(topology, LocalRedisCluster):
                victim = topology.kill_primary_of(f"usher:{{{MODELS[0]}}}:queue")
                await asyncio.to_thread(topology.wait_failover)
            else:
                assert isinstance(topology, LocalSentinel)
                old = topology.primary_port()
                victim = topology.kill_primary()
                await asyncio.to_thread(topology.wait_failover, old)
            victim.start()  # it comes back as a replica of the promoted one
            await running
            states = await final_states(scheduler, load.accepted, timeout=180)
    lost = [i for i, s in states.items() if s == -1]
    unfinished = {i: s for i, s in states.items() if s != request_pb2.REQUEST_STATE_COMPLETED}
    print(f"{len(load.accepted)} accepted, {load.retried} retries, {len(unfinished)} unfinished")
    assert len(set(load.accepted)) == 120  # every one accepted in the end, once
    assert lost == [], f"accepted requests lost on failover (logs in {tmp_path})"
    assert unfinished == {}, f"{unfinished} (logs in {tmp_path})"
