"""What a caller sees of a call's life, alike over gRPC and through the in-process channel
of ``usher serve`` (the ``notifier`` fixture runs both): deadlines, cancellation that ends
the servicer's work, errors with their status and rich details."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_status import rpc_status

from services.scheduler.store import QueueStore
from tests.notifier.conftest import NotifierClient
from tests.notifier.test_watch import _submit
from usher.v1 import notifier_pb2

K = notifier_pb2


async def _all_updates(call: object) -> None:
    async for _ in call:  # type: ignore[attr-defined]
        pass


async def _first_update(call: object) -> None:
    async for _ in call:  # type: ignore[attr-defined]
        return


async def test_a_watch_past_its_deadline_ends_with_deadline_exceeded(
    notifier: NotifierClient, store: QueueStore
) -> None:
    request_id = await _submit(store)
    call = notifier.stub.Watch(
        K.WatchRequest(id=request_id), metadata=notifier.auth("alice"), timeout=0.3
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _all_updates(call)  # the snapshot, then nothing: it stays queued
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_cancelling_a_watch_ends_the_servicers_subscription(
    notifier: NotifierClient, store: QueueStore
) -> None:
    request_id = await _submit(store)
    call = notifier.stub.Watch(K.WatchRequest(id=request_id), metadata=notifier.auth("alice"))
    first = asyncio.Event()

    async def collect() -> None:
        async for _ in call:
            first.set()

    reader = asyncio.ensure_future(collect())
    await asyncio.wait_for(first.wait(), 5)
    assert notifier.app.fanout.watchers == 1
    call.cancel()  # from another task than the reader, as the dispatcher's heartbeat does
    with pytest.raises(asyncio.CancelledError):
        await reader
    for _ in range(100):  # the server side ends the call's handler a moment later
        if notifier.app.fanout.watchers == 0:
            break
        await asyncio.sleep(0.02)
    assert notifier.app.fanout.watchers == 0


async def test_errors_carry_their_status_and_the_field_at_fault(
    notifier: NotifierClient,
) -> None:
    call = notifier.stub.Watch(K.WatchRequest(id="not-an-id"), metadata=notifier.auth("alice"))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _first_update(call)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "id" in (raised.value.details() or "")
    status = rpc_status.from_call(raised.value)  # google.rpc details as a server sends them
    assert status is not None and status.details


async def test_a_caller_without_a_valid_token_is_unauthenticated(
    notifier: NotifierClient, store: QueueStore
) -> None:
    request_id = await _submit(store)
    call = notifier.stub.Watch(
        K.WatchRequest(id=request_id), metadata=(("authorization", "Bearer nobody"),)
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _first_update(call)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
