"""The gateway beside a Notifier older than AwaitResult (mid-upgrade): an answer sent whole
is still waited for, through a final-only Watch, and AwaitResult is not asked again."""

from __future__ import annotations

import contextlib

from services.gateway.backend import Backend
from services.gateway.flow import Finished, RequestFlow
from services.gateway.settings import GatewaySettings
from tests.clients.scripted_notifier import DONE, ScriptedNotifier, scripted_event, serve_notifier
from usher.v1 import notifier_pb2, scheduler_pb2


async def test_a_whole_answer_waits_through_watch_on_an_older_notifier() -> None:
    done = scripted_event("6-1", notifier_pb2.UPDATE_KIND_COMPLETED, DONE, final="x")
    notifier = ScriptedNotifier([[done], [done]])  # no AwaitResult: UNIMPLEMENTED
    server, address = await serve_notifier(notifier)
    backend = Backend(GatewaySettings(notifier_address=address, service_token="svc"))
    await backend.start()
    try:
        finals = []
        for _ in range(2):
            flow = RequestFlow(backend, "t", scheduler_pb2.SubmitRequest(model="m"))
            flow.request_id = "01ABC"
            async with contextlib.aclosing(flow.events(final_only=True)) as events:
                finals += [e.request.result.text async for e in events if isinstance(e, Finished)]
    finally:
        await backend.close()
        await server.stop(None)
    assert finals == ["x", "x"]
    assert notifier.awaited == 1 and not backend.await_result
    assert notifier.resumed_from == ["", ""]
