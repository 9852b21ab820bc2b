"""Long-lived HTTP responses: Server-Sent Event responses whose headers go out at once and
a keepalive that writes a comment every few seconds while nothing else is said, so a proxy
with an idle timeout (ingress-nginx and most cloud load balancers: 60 s) does not cut a
request that is still waiting in the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping

from aiohttp import web

__all__ = ["SSE", "Keepalive", "open_event_stream"]

SSE = "text/event-stream"


async def open_event_stream(
    request: web.Request, headers: Mapping[str, str] | None = None
) -> web.StreamResponse:
    """Send an event stream's headers now. ``X-Accel-Buffering: no`` asks nginx not to
    buffer it (the Ingress example also turns buffering off)."""
    response = web.StreamResponse(
        headers={
            "Content-Type": SSE,
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            **(headers or {}),
        }
    )
    await response.prepare(request)
    return response


class Keepalive:
    """Writes ``line()`` to ``response`` every ``interval`` seconds until stopped.

    Writes of whole frames do not interleave (each ``write`` hands its bytes to the
    transport in one piece), so the keepalive may run beside the stream's own writer.
    """

    def __init__(
        self, response: web.StreamResponse, interval: float, line: Callable[[], bytes]
    ) -> None:
        self._response = response
        self._interval = interval
        self._line = line
        self._task: asyncio.Task[None] | None = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            while True:
                await asyncio.sleep(self._interval)
                await self._response.write(self._line())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def __enter__(self) -> Keepalive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
