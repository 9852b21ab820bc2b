"""Errors as the gateway answers them: one ``GatewayError`` (HTTP status, machine-readable
code, message, field, Retry-After); what failed gRPC calls (with their google.rpc details:
BadRequest field violations, RetryInfo) and requests that ended otherwise than completed
map to; and the two shapes it is rendered in: Ollama's ``{"error": ...}`` and OpenAI's
``{"error": {"message", "type", "param", "code"}}``. A route answers in its API's shape
(``error_response``); one the middleware answers for takes the path's (OpenAI under /v1/).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import grpc
from aiohttp import web

from services.gateway.responses import json_response
from usher.errors import status_details
from usher.v1 import request_pb2

__all__ = [
    "Api",
    "GatewayError",
    "bad_request",
    "error_from_request",
    "error_from_rpc",
    "error_response",
    "http_field",
    "model_not_found",
    "ollama_error_body",
    "openai_error_body",
    "openai_status",
    "path_error_response",
    "rpc_error",
]

#: Which API an answer is for: its errors take that API's shape.
Api = Literal["ollama", "openai"]


class GatewayError(Exception):
    """An answer other than success: HTTP status, machine-readable code, message."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str = "",
        retry_after: float | None = None,
        model: str = "",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.retry_after = retry_after
        self.model = model

    def with_model(self, model: str) -> GatewayError:
        self.model = self.model or model
        return self

    def retry_after_header(self) -> str | None:
        """``Retry-After`` in whole seconds (at least 1), when the error has one."""
        if self.retry_after is None:
            return None
        return str(max(1, math.ceil(self.retry_after)))

    def __repr__(self) -> str:
        return f"GatewayError({self.status}, {self.code!r}, {self.message!r})"


def bad_request(field_name: str, description: str) -> GatewayError:
    return GatewayError(400, "invalid_request", f"{field_name}: {description}", field=field_name)


def http_field(proto_field: str) -> str:
    """A Submit field path as the HTTP body names it: ``chat.messages[0].role`` →
    ``messages[0].role``, ``generate.prompt`` → ``prompt``, ``embed.input`` → ``input``."""
    for prefix in ("chat.", "generate.", "embed."):
        if proto_field.startswith(prefix):
            return proto_field[len(prefix) :]
    return {"chat": "messages", "generate": "prompt", "embed": "input"}.get(
        proto_field, proto_field
    )


#: Text gRPC writes itself into a status (not one of our messages).
_TRANSPORT_TEXT = re.compile(
    r"ipv4:|ipv6:|unix:|failed to connect|Socket closed|Connection refused|Exception|Traceback",
    re.IGNORECASE,
)


def error_from_rpc(
    code: grpc.StatusCode,
    message: str,
    trailing: Sequence[tuple[str, str | bytes]] = (),
    *,
    model: str = "",
) -> GatewayError:
    """A failed gRPC call → the HTTP error to answer with."""
    violations, retry_after = status_details(trailing)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        if violations:
            text = "; ".join(f"{http_field(v.field)}: {v.description}" for v in violations)
            return GatewayError(
                400, "invalid_request", text, field=http_field(violations[0].field), model=model
            )
        return GatewayError(400, "invalid_request", message, model=model)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        if "rate limit" in message.lower():
            return GatewayError(
                429, "rate_limited", message, retry_after=retry_after or 1.0, model=model
            )
        return GatewayError(
            503,
            "queue_full",
            "Server is currently busy processing other requests. Please try again later. "
            f"({message})",
            retry_after=retry_after or 1.0,
            model=model,
        )
    simple: Mapping[grpc.StatusCode, tuple[int, str]] = {
        grpc.StatusCode.UNAUTHENTICATED: (401, "unauthorized"),
        grpc.StatusCode.PERMISSION_DENIED: (403, "forbidden"),
        grpc.StatusCode.NOT_FOUND: (404, "not_found"),
        grpc.StatusCode.FAILED_PRECONDITION: (409, "failed_precondition"),
        grpc.StatusCode.ALREADY_EXISTS: (409, "conflict"),
        grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
        grpc.StatusCode.UNAVAILABLE: (503, "unavailable"),
        grpc.StatusCode.CANCELLED: (503, "unavailable"),
        grpc.StatusCode.ABORTED: (502, "upstream_error"),
        grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented"),
    }
    status, error_code = simple.get(code, (500, "internal"))
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        message = "Request timed out. Please try again with a shorter prompt or later."
    elif status == 500 or _TRANSPORT_TEXT.search(message):
        # gRPC's own text (connection failures, a peer's crash) names internal addresses
        # and libraries: the caller learns what kind of failure it was, nothing more.
        message = "internal error" if status == 500 else "a service is unavailable; retry shortly"
    return GatewayError(
        status,
        error_code,
        message or code.name.lower(),
        retry_after=retry_after if retry_after is not None else (1.0 if status == 503 else None),
        model=model,
    )


def error_from_request(request: request_pb2.LlmRequest) -> GatewayError | None:
    """The error a finished request answers with (None when it completed)."""
    state = request.state
    model = request.model
    if state == request_pb2.REQUEST_STATE_EXPIRED:
        return GatewayError(
            504,
            "timeout",
            "Request timed out. Please try again with a shorter prompt or later."
            + (f" ({request.error})" if request.error else ""),
            model=model,
        )
    if state == request_pb2.REQUEST_STATE_CANCELLED:
        return GatewayError(
            409, "cancelled", request.error or "the request was cancelled", model=model
        )
    if state == request_pb2.REQUEST_STATE_FAILED:
        text = request.error or "the request failed"
        lowered = text.lower()
        if "does not support" in lowered:
            return GatewayError(400, "invalid_request", text, model=model)
        return GatewayError(500, "failed", text, model=model)
    return None


def ollama_error_body(error: GatewayError) -> dict[str, Any]:
    """Ollama's ``{"error": ...}``, plus a machine-readable ``code``.

    Queue full and timeout keep the Guard Proxy's shape, where ``error`` is the code:
    ``{"error": "queue_full", "message": ..., "model": ...}``.
    """
    if error.code in ("queue_full", "timeout", "rate_limited"):
        body: dict[str, Any] = {
            "error": error.code,
            "message": error.message,
            "model": error.model,
            "code": error.code,
        }
    else:
        body = {"error": error.message, "code": error.code}
        if error.model:
            body["model"] = error.model
    if error.field:
        body["field"] = error.field
    if error.retry_after is not None:
        body["retry_after_seconds"] = error.retry_after
    return body


def openai_status(error: GatewayError) -> int:
    """OpenAI clients back off on 429, so a full queue is 429 there (503 for Ollama)."""
    return 429 if error.code == "queue_full" else error.status


def openai_error_body(error: GatewayError) -> dict[str, Any]:
    status = openai_status(error)
    kind = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "invalid_request_error",
        409: "invalid_request_error",
        429: "rate_limit_error",
    }.get(status, "api_error" if status < 500 or status == 500 else "server_error")
    return {
        "error": {
            "message": error.message,
            "type": kind,
            "param": error.field or None,
            "code": error.code,
        }
    }


def rpc_error(exc: grpc.aio.AioRpcError, model: str = "") -> GatewayError:
    trailing = exc.trailing_metadata()
    pairs = [(str(k), v) for k, v in trailing] if trailing else []
    return error_from_rpc(exc.code(), exc.details() or "", pairs, model=model)


def model_not_found(model: str, path: str) -> GatewayError:
    """The 404 for a model no instance has (the legacy embeddings route words it as
    Ollama does there)."""
    if path == "/api/embeddings":
        message = f'model "{model}" not found, try pulling it first'
    else:
        message = f"model '{model}' not found"
    return GatewayError(404, "model_not_found", message, field="model", model=model)


def error_response(
    api: Api, error: GatewayError, headers: Mapping[str, str] | None = None
) -> web.Response:
    """``error`` as ``api`` answers it."""
    if api == "openai":
        return json_response(openai_error_body(error), openai_status(error), headers)
    return json_response(ollama_error_body(error), error.status, headers)


def path_error_response(request: web.Request, error: GatewayError) -> web.Response:
    """An error in the shape of the API the path belongs to (OpenAI under /v1/)."""
    return error_response("openai" if request.path.startswith("/v1/") else "ollama", error)
