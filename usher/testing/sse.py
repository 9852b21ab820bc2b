"""A plain Server-Sent Events reader over aiohttp, for tests and benchmarks: what a
browser's EventSource does, without the reconnecting (callers resume by hand with the
last id)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

__all__ = ["SseEvent", "sse_events"]


@dataclass
class SseEvent:
    #: "message" unless the server named it; "comment" for a ``:`` line.
    event: str = "message"
    id: str = ""
    data: str = ""
    #: The ``retry`` field, when sent.
    retry: int | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.data)


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[SseEvent]:
    """Each event (and each comment, as event "comment") as it arrives."""
    current = SseEvent()
    data: list[str] = []
    while True:
        raw = await response.content.readline()
        if not raw:
            return
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data or current.id or current.event != "message":
                current.data = "\n".join(data)
                yield current
            current, data = SseEvent(), []
            continue
        if line.startswith(":"):
            yield SseEvent(event="comment", data=line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name == "id":
            current.id = value
        elif name == "event":
            current.event = value
        elif name == "retry" and value.isdigit():
            current.retry = int(value)
        else:
            current.extra[name] = value
