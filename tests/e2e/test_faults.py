"""Faults with the whole system running: SIGKILL a Scheduler or the Pool mid-run, restart
Redis (AOF, fsync always) — every accepted request still completes, exactly once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest

from usher.testing.stack import LocalStack, StackConfig
from usher.v1 import request_pb2, scheduler_pb2, scheduler_pb2_grpc

pytestmark = pytest.mark.slow
ALICE = (("authorization", "Bearer alice-token"),)
COMPLETED = request_pb2.REQUEST_STATE_COMPLETED


@pytest.fixture
def stack() -> Iterator[LocalStack]:
    config = StackConfig(
        redis_appendfsync="always",
        emulator_args=(
            "--fleet",
            "2",
            "--tokens-per-second",
            "150",
            "--load-time",
            "0.05",
            "--parallel",
            "2",
            "--output-tokens",
            "30:60",
        ),
        scheduler_env={"USHER_LEASE_SECONDS": "1.5", "USHER_REAP_INTERVAL_SECONDS": "0.1"},
        pool_env={"USHER_POOL_SLOT_LEASE_SECONDS": "3"},
    )
    with LocalStack(config) as running:
        yield running


async def submit_many(stack: LocalStack, n: int) -> list[str]:
    async with grpc.aio.insecure_channel(stack.scheduler_address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        return [
            (
                await stub.Submit(
                    scheduler_pb2.SubmitRequest(
                        model="llama3.2:1b", generate=request_pb2.GenerateInput(prompt=f"job {i}")
                    ),
                    metadata=ALICE,
                )
            ).request.id
            for i in range(n)
        ]


async def states(stack: LocalStack, ids: list[str]) -> dict[str, int]:
    async with grpc.aio.insecure_channel(stack.scheduler_address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        out: dict[str, int] = {}
        for request_id in ids:
            try:
                reply = await stub.Get(
                    scheduler_pb2.GetRequest(id=request_id), metadata=ALICE, timeout=2
                )
                out[request_id] = reply.request.state
            except grpc.aio.AioRpcError:
                out[request_id] = -1
        return out


async def wait_running(stack: LocalStack, ids: list[str]) -> None:
    for _ in range(100):
        # Any of them: on a slow machine the first few may be done before the first look.
        if request_pb2.REQUEST_STATE_RUNNING in (await states(stack, ids)).values():
            return
        await asyncio.sleep(0.05)
    pytest.fail("nothing started running")


async def wait_all_completed(
    stack: LocalStack, ids: list[str], seconds: float = 60
) -> dict[str, int]:
    deadline = time.monotonic() + seconds
    current: dict[str, int] = {}
    while time.monotonic() < deadline:
        current = await states(stack, ids)
        if all(state == COMPLETED for state in current.values()):
            return current
        await asyncio.sleep(0.25)
    stuck = {k: v for k, v in current.items() if v != COMPLETED}
    pytest.fail(f"{len(stuck)} of {len(ids)} requests never completed: {stuck}")


async def test_sigkill_a_scheduler_mid_run(stack: LocalStack) -> None:
    ids = await submit_many(stack, 30)
    await wait_running(stack, ids)
    stack.schedulers[0].kill()  # its leases expire; the work goes back to its place
    stack.start_scheduler(0)
    await wait_all_completed(stack, ids)


async def test_sigkill_the_pool_mid_run(stack: LocalStack) -> None:
    ids = await submit_many(stack, 30)
    await wait_running(stack, ids)
    assert stack.pool is not None
    stack.pool.kill()  # in-flight streams break: dispatchers hand their requests back
    await asyncio.sleep(0.5)
    stack.start_pool()
    await wait_all_completed(stack, ids)


async def test_restart_redis_mid_run(stack: LocalStack) -> None:
    ids = await submit_many(stack, 30)
    await wait_running(stack, ids)
    assert stack.redis is not None
    stack.redis.kill()
    await asyncio.sleep(0.5)
    stack.redis.start()
    await wait_all_completed(stack, ids)


async def test_a_model_server_dying_mid_answer_fails_over(stack: LocalStack) -> None:
    import httpx

    from usher.v1 import notifier_pb2, notifier_pb2_grpc

    ids = await submit_many(stack, 12)
    await wait_running(stack, ids)
    async with httpx.AsyncClient() as http:
        # The first instance crashes after a few more tokens of whatever it is running.
        await http.post(f"{stack.model_urls[0]}/_emulator/faults", json={"crash_after_tokens": 3})
    await wait_all_completed(stack, ids)
    async with grpc.aio.insecure_channel(stack.scheduler_address) as channel:
        scheduler = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        attempts = [
            (await scheduler.Get(scheduler_pb2.GetRequest(id=i), metadata=ALICE)).request.attempts
            for i in ids
        ]
    assert max(attempts) >= 2, "no request was caught by the crash"
    # A watcher of any request sees one coherent answer: output of a failed attempt is void.
    async with grpc.aio.insecure_channel(stack.notifier_address) as channel:
        notifier = notifier_pb2_grpc.NotifierServiceStub(channel)
        for request_id in ids:
            updates = [
                u
                async for u in notifier.Watch(
                    notifier_pb2.WatchRequest(id=request_id), metadata=ALICE
                )
            ]
            assert updates[-1].kind == notifier_pb2.UPDATE_KIND_COMPLETED
            assert updates[-1].text_delta == updates[-1].request.result.text


@pytest.fixture
def slow_stack() -> Iterator[LocalStack]:
    """One instance, answers of about three seconds, and the HTTP gateway."""
    config = StackConfig(
        emulator_args=(
            "--tokens-per-second",
            "15",
            "--load-time",
            "0",
            "--parallel",
            "2",
            "--output-tokens",
            "45:45",
        ),
        scheduler_env={"USHER_LEASE_SECONDS": "1.5", "USHER_REAP_INTERVAL_SECONDS": "0.1"},
        gateway=True,
    )
    with LocalStack(config) as running:
        yield running


async def test_an_answer_awaited_by_a_killed_scheduler_still_reaches_its_client(
    slow_stack: LocalStack,
) -> None:
    """The gateway's Submit waits in the Scheduler for the end of a request it started at
    once; the Scheduler is SIGKILLed meanwhile. The id it sent first lets the gateway wait
    on the Notifier instead: the request runs again and the client gets its answer."""
    import httpx

    async with httpx.AsyncClient(timeout=60) as http:
        answer = asyncio.create_task(
            http.post(
                f"{slow_stack.gateway_url}/api/generate",
                json={"model": "llama3.2:1b", "prompt": "a long story", "stream": False},
                headers={"Authorization": "Bearer alice-token"},
            )
        )
        async with grpc.aio.insecure_channel(slow_stack.scheduler_address) as channel:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            for _ in range(200):
                running = await stub.List(
                    scheduler_pb2.ListRequest(states=[request_pb2.REQUEST_STATE_RUNNING]),
                    metadata=ALICE,
                )
                if running.requests:
                    break
                await asyncio.sleep(0.02)
            else:
                pytest.fail("the request never ran")
        assert not answer.done()
        slow_stack.schedulers[0].kill()
        slow_stack.start_scheduler(0)
        reply = await answer
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["done"] is True and body["response"]
    assert reply.headers["X-Usher-Request-Id"] == running.requests[0].id


async def test_a_submit_waits_no_longer_than_it_asked(slow_stack: LocalStack) -> None:
    """A run longer than the Submit's ``await_result`` is answered running when that time
    is up (its end is then the Notifier's to tell)."""
    from usher.v1 import notifier_pb2, notifier_pb2_grpc

    asked = scheduler_pb2.SubmitRequest(
        model="llama3.2:1b",
        generate=request_pb2.GenerateInput(prompt="a long story"),
        result_only=True,
    )
    asked.await_result.FromMilliseconds(500)  # the run takes about three seconds
    async with grpc.aio.insecure_channel(slow_stack.scheduler_address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        for _ in range(3):
            started = time.monotonic()
            answer = (await stub.Submit(asked, metadata=ALICE, timeout=30)).request
            waited = time.monotonic() - started
            assert waited < 2.0 and answer.state != COMPLETED
            if waited >= 0.45:  # it started at once and was waited for
                break
        else:
            pytest.fail("no request started at once")
    async with grpc.aio.insecure_channel(slow_stack.notifier_address) as channel:
        final = await notifier_pb2_grpc.NotifierServiceStub(channel).AwaitResult(
            notifier_pb2.AwaitResultRequest(id=answer.id), metadata=ALICE, timeout=30
        )
    assert final.update.request.state == COMPLETED
