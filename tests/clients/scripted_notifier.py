"""A Notifier that plays scripts, for the SDK's and the gateway's handling of dropped
streams, retries and a Notifier older than AwaitResult, served on a real gRPC socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import grpc
import grpc.aio

from usher.testing.processes import free_port
from usher.v1 import notifier_pb2, notifier_pb2_grpc, request_pb2

__all__ = ["DONE", "QUEUED", "RUNNING", "ScriptedNotifier", "scripted_event", "serve_notifier"]

K = notifier_pb2


def scripted_event(
    event_id: str, kind: int, state: int, text: str = "", final: str = ""
) -> notifier_pb2.WatchResponse:
    request = request_pb2.LlmRequest(id="01ABC", model="m", state=state)  # type: ignore[arg-type]
    if final:
        request.result.text = final
    return notifier_pb2.WatchResponse(
        event_id=event_id,
        kind=kind,  # type: ignore[arg-type]
        request=request,
        text_delta=text,
    )


RUNNING = request_pb2.REQUEST_STATE_RUNNING
QUEUED = request_pb2.REQUEST_STATE_QUEUED
DONE = request_pb2.REQUEST_STATE_COMPLETED


class ScriptedNotifier(notifier_pb2_grpc.NotifierServiceServicer):
    """Plays one script per Watch call: a response is sent, a number is a pause (seconds),
    None drops the connection. AwaitResult answers from ``answers`` (None drops the
    connection); without them, UNIMPLEMENTED, as a Notifier older than it answers."""

    def __init__(
        self,
        scripts: Sequence[Sequence[notifier_pb2.WatchResponse | float | None]],
        answers: list[notifier_pb2.WatchResponse | None] | None = None,
    ) -> None:
        self.scripts = list(scripts)
        self.resumed_from: list[str] = []
        self.answers = answers
        self.awaited = 0

    async def AwaitResult(  # noqa: N802 - the RPC's name
        self,
        request: notifier_pb2.AwaitResultRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> notifier_pb2.AwaitResultResponse:
        self.awaited += 1
        if self.answers is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        answer = self.answers.pop(0)
        if answer is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "notifier going away")
        return notifier_pb2.AwaitResultResponse(update=answer)

    async def Watch(  # noqa: N802 - the RPC's name
        self,
        request: notifier_pb2.WatchRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[notifier_pb2.WatchResponse]:
        self.resumed_from.append(request.last_event_id)
        for item in self.scripts.pop(0):
            if item is None:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "notifier going away")
            elif isinstance(item, float | int):
                await asyncio.sleep(item)
            else:
                yield item

    async def WatchQueues(  # noqa: N802 - the RPC's name
        self,
        request: notifier_pb2.WatchQueuesRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[notifier_pb2.WatchQueuesResponse]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")
        yield notifier_pb2.WatchQueuesResponse()


async def serve_notifier(notifier: ScriptedNotifier) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    notifier_pb2_grpc.add_NotifierServiceServicer_to_server(notifier, server)
    address = f"127.0.0.1:{free_port()}"
    server.add_insecure_port(address)
    await server.start()
    return server, address
