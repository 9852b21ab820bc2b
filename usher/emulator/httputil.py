"""Small aiohttp helpers shared by the native and OpenAI-compatible handlers."""

from __future__ import annotations

import asyncio
import json
from typing import Any, NoReturn

from aiohttp import web

from usher.emulator.engine import Engine

__all__ = ["abort_connection", "dumps", "error_response", "json_response", "start_stream"]


def dumps(obj: Any) -> str:
    """Compact JSON like Go's ``encoding/json``."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def json_response(obj: Any, status: int = 200) -> web.Response:
    # gin's c.JSON content type.
    return web.Response(
        status=status,
        body=dumps(obj).encode(),
        content_type="application/json",
        charset="utf-8",
    )


def error_response(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status)


async def start_stream(request: web.Request, content_type: str) -> web.StreamResponse:
    """Send 200 headers for a streamed body. Called lazily, at the first chunk, so
    an error before any output can still become a plain 4xx/5xx JSON answer."""
    resp = web.StreamResponse(status=200)
    resp.content_type = content_type
    await resp.prepare(request)
    return resp


async def abort_connection(request: web.Request, engine: Engine, *, crash: bool) -> NoReturn:
    """Drop the TCP connection mid-response (optionally crashing the instance)."""
    if crash:
        engine.crash()
    transport = request.transport
    if transport is not None:
        transport.abort()
    # Nothing more can be sent; end the handler the way a disconnect would.
    raise asyncio.CancelledError
