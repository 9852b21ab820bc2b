"""Small aiohttp helpers shared by the native and OpenAI-compatible handlers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, NoReturn

from aiohttp import web

from usher.emulator.engine import ApiError, Crash, Drop, Engine, StreamError
from usher.emulator.stats import ModelStats

__all__ = [
    "abort_connection",
    "dumps",
    "error_response",
    "fail_generation",
    "json_response",
    "start_stream",
]


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


async def fail_generation(
    request: web.Request,
    engine: Engine,
    model_stats: ModelStats,
    resp: web.StreamResponse | None,
    fault: StreamError | Drop | Crash,
    error_line: Callable[[str], bytes],
) -> web.StreamResponse:
    """A generation's fault, as the API's server shows it: an error before any output is
    a plain 500 (ApiError); after output, the API's own error line (``error_line`` of the
    message) ends the stream; a dropped connection or a crash cuts it."""
    model_stats.failed += 1
    if isinstance(fault, StreamError) and resp is None:
        raise ApiError(500, fault.message)  # counted where the error is answered
    engine.stats.requests_failed += 1
    if not isinstance(fault, StreamError) or resp is None:
        await abort_connection(request, engine, crash=isinstance(fault, Crash))
    await resp.write(error_line(fault.message))
    await resp.write_eof()
    return resp
