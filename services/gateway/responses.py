"""Answer bodies on the wire: JSON text, JSON responses, NDJSON lines."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

__all__ = ["NDJSON", "dumps", "json_response", "ndjson_line"]

NDJSON = "application/x-ndjson"


def dumps(body: Any) -> str:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


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
    return (dumps(body) + "\n").encode()
