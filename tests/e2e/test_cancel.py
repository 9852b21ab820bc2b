"""Cancelling a running request stops it at once: the announcement wakes the dispatcher
that runs it (well before its next heartbeat), which closes the stream to the model server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest

from usher.testing.stack import LocalStack, StackConfig
from usher.v1 import notifier_pb2, notifier_pb2_grpc, request_pb2, scheduler_pb2, scheduler_pb2_grpc

pytestmark = pytest.mark.slow
ALICE = (("authorization", "Bearer alice-token"),)


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    config = StackConfig(
        emulator_args=(
            "--fleet",
            "1",
            "--tokens-per-second",
            "20",
            "--load-time",
            "0.05",
            "--parallel",
            "2",
            "--output-tokens",
            "400:400",
        ),
        scheduler_env={"USHER_LEASE_SECONDS": "30"},  # heartbeats every 10 s
    )
    with LocalStack(config) as running:
        yield running


async def test_cancel_of_a_running_request_takes_effect_at_once(stack: LocalStack) -> None:
    async with (
        grpc.aio.insecure_channel(stack.scheduler_address) as scheduler_channel,
        grpc.aio.insecure_channel(stack.notifier_address) as notifier_channel,
    ):
        scheduler = scheduler_pb2_grpc.SchedulerServiceStub(scheduler_channel)
        notifier = notifier_pb2_grpc.NotifierServiceStub(notifier_channel)
        sent = await scheduler.Submit(
            scheduler_pb2.SubmitRequest(
                model="llama3.2:1b", generate=request_pb2.GenerateInput(prompt="long")
            ),
            metadata=ALICE,
        )
        async for update in notifier.Watch(
            notifier_pb2.WatchRequest(id=sent.request.id), metadata=ALICE
        ):
            if update.kind == notifier_pb2.UPDATE_KIND_PROGRESS:
                break
        asked = time.monotonic()
        await scheduler.Cancel(
            scheduler_pb2.CancelRequest(id=sent.request.id, reason="changed my mind"),
            metadata=ALICE,
        )
        state = request_pb2.REQUEST_STATE_RUNNING
        while time.monotonic() - asked < 5:
            got = await scheduler.Get(scheduler_pb2.GetRequest(id=sent.request.id), metadata=ALICE)
            state = got.request.state
            if state == request_pb2.REQUEST_STATE_CANCELLED:
                break
            await asyncio.sleep(0.05)
        took = time.monotonic() - asked
        assert state == request_pb2.REQUEST_STATE_CANCELLED
        assert got.request.error == "changed my mind"
        assert took < 2.0, f"cancel took {took:.1f}s"
    async with httpx.AsyncClient() as http:
        for _ in range(40):
            stats = (await http.get(f"{stack.model_urls[0]}/_emulator/stats")).json()
            if stats["in_flight"] == 0:
                break
            await asyncio.sleep(0.05)
        assert stats["in_flight"] == 0  # the model server stopped generating
