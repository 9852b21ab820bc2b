"""Batch Submit through real processes: many requests in one call, each with its own id,
admitted together or not at all (a full queue, a bad request, a racing batch)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from clients.aio import AsyncUsherClient
from clients.types import RequestState
from usher.testing.stack import LocalStack, StackConfig
from usher.v1 import request_pb2, scheduler_pb2, scheduler_pb2_grpc

pytestmark = pytest.mark.slow
MODEL = "llama3.2:1b"
ALICE = (("authorization", "Bearer alice-token"),)
ADMIN = (("authorization", "Bearer admin-token"),)


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    config = StackConfig(
        emulator_args=("--fleet", "1", "--instant", "--parallel", "4"),
        scheduler_env={"USHER_QUEUE_MAX_SIZE": "10"},
    )
    with LocalStack(config) as running:
        yield running


@pytest.fixture
async def stubs(
    stack: LocalStack,
) -> AsyncIterator[
    tuple[
        scheduler_pb2_grpc.SchedulerServiceAsyncStub,
        scheduler_pb2_grpc.SchedulerAdminServiceAsyncStub,
    ]
]:
    async with grpc.aio.insecure_channel(stack.scheduler_address) as channel:
        yield (
            scheduler_pb2_grpc.SchedulerServiceStub(channel),
            scheduler_pb2_grpc.SchedulerAdminServiceStub(channel),
        )


def batch(n: int, tag: str) -> scheduler_pb2.SubmitBatchRequest:
    return scheduler_pb2.SubmitBatchRequest(
        requests=[
            scheduler_pb2.SubmitRequest(
                model=MODEL, generate=request_pb2.GenerateInput(prompt=f"{tag} {i}")
            )
            for i in range(n)
        ]
    )


async def queued(admin: scheduler_pb2_grpc.SchedulerAdminServiceAsyncStub) -> int:
    stats = await admin.GetQueueStats(
        scheduler_pb2.GetQueueStatsRequest(models=[MODEL]), metadata=ADMIN
    )
    return int(stats.stats[0].queued) if stats.stats else 0


async def test_a_batch_is_admitted_whole_or_refused_whole(stack: LocalStack, stubs: tuple) -> None:  # type: ignore[type-arg]
    scheduler, admin = stubs
    await admin.PauseQueue(
        scheduler_pb2.PauseQueueRequest(model=MODEL, paused=True), metadata=ADMIN
    )
    first = await scheduler.SubmitBatch(batch(6, "first"), metadata=ALICE)
    ids = [r.request.id for r in first.responses]
    assert len(set(ids)) == 6
    assert all(r.request.state == request_pb2.REQUEST_STATE_QUEUED for r in first.responses)

    # Room for 4 more, not 6: nothing of the batch is queued.
    with pytest.raises(grpc.aio.AioRpcError) as full:
        await scheduler.SubmitBatch(batch(6, "second"), metadata=ALICE)
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await queued(admin) == 6

    # One bad request refuses the batch, naming it.
    bad = batch(3, "bad")
    bad.requests[2].options.temperature = -1
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await scheduler.SubmitBatch(bad, metadata=ALICE)
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "requests[2].options.temperature" in (invalid.value.details() or "")
    assert await queued(admin) == 6

    # Two batches race for room for one of them: exactly one gets in, whole.
    results = await asyncio.gather(
        scheduler.SubmitBatch(batch(4, "race a"), metadata=ALICE),
        scheduler.SubmitBatch(batch(4, "race b"), metadata=ALICE),
        return_exceptions=True,
    )
    admitted = [r for r in results if isinstance(r, scheduler_pb2.SubmitBatchResponse)]
    assert len(admitted) == 1 and await queued(admin) == 10

    await admin.PauseQueue(
        scheduler_pb2.PauseQueueRequest(model=MODEL, paused=False), metadata=ADMIN
    )
    async with AsyncUsherClient(
        stack.scheduler_address, stack.notifier_address, token="alice-token"
    ) as alice:
        for request_id in [*ids, *(r.request.id for r in admitted[0].responses)]:
            done = await alice.wait(request_id, timeout=30)
            assert done.state == RequestState.COMPLETED
        # The SDK's batch: its own ids, in order.
        sent = await alice.submit_batch(MODEL, ["sdk one", "sdk two", "sdk three"])
        assert len({s.id for s in sent}) == 3
        for submission in sent:
            assert (await alice.wait(submission.id, timeout=30)).state == RequestState.COMPLETED
