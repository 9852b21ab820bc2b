"""Answer bodies on the wire: JSON text, JSON responses, NDJSON lines.

Encoded with orjson (a streamed answer writes a line per update: the stdlib encoder cost
more than the rest of the gateway's work on it); what orjson refuses (an integer beyond 64
bits, a key that is not a string) falls back to the stdlib encoder, whose output is the same
for everything else."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

__all__ = ["NDJSON", "dumps", "json_response", "ndjson_line"]

NDJSON = "application/x-ndjson"


def _encoded(body: Any) -> bytes:
    try:
        return orjson.dumps(body)
    except TypeError:  # orjson's JSONEncodeError is one
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def dumps(body: Any) -> str:
    return _encoded(body).decode()


def json_response(
    body: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        text=dumps(body),
        status=status,
        content_type="application/json",
        charset="utf-8",
        headers=dict(headers or {}),
    )


def ndjson_line(body: Any) -> bytes:
    return _encoded(body) + b"\n"
