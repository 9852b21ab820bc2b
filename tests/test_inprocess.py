"""The in-process transport (``usher serve``) as a gRPC client sees it: a unary call's
initial metadata, sent before the handler fails, is there for the caller afterwards, as
over the wire (the gateway finds a waiting Submit's request id by it)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from usher.errors import Unavailable
from usher.ids import REQUEST_ID_METADATA
from usher.inprocess import LocalChannel
from usher.v1 import scheduler_pb2, scheduler_pb2_grpc


class _Breaks(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Sends the id first, then fails: a Scheduler gone mid-wait."""

    async def Submit(  # noqa: N802 - the RPC's name
        self, request: scheduler_pb2.SubmitRequest, context: Any
    ) -> scheduler_pb2.SubmitResponse:
        await context.send_initial_metadata(((REQUEST_ID_METADATA, "the-id"),))
        raise Unavailable("gone")


async def test_initial_metadata_outlives_a_failed_unary_call() -> None:
    local = LocalChannel()
    breaks = _Breaks()  # type: ignore[abstract]  # the other methods: UNIMPLEMENTED
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(breaks, local.as_server())
    stub = scheduler_pb2_grpc.SchedulerServiceStub(local.as_channel())
    call = stub.Submit(scheduler_pb2.SubmitRequest(model="m"))
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    sent = await call.initial_metadata()
    assert sent is not None and sent.get(REQUEST_ID_METADATA) == "the-id"
