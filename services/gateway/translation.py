"""Pure translation between HTTP APIs and Usher's protobuf API (no I/O anywhere here).

* Requests: Ollama's ``/api/chat``, ``/api/generate``, ``/api/embed``, ``/api/embeddings``
  and OpenAI's ``/v1/chat/completions``, ``/v1/embeddings`` bodies → ``SubmitRequest``;
  the ``X-Usher-*`` headers → priority, fallback policy, queue timeout, deadline.
* Responses: a finished ``LlmRequest`` (and streamed text deltas) → Ollama NDJSON chunks
  with Ollama's field names and nanosecond durations, or OpenAI chat-completion (chunk)
  objects; embeddings in both shapes.
* Errors: gRPC statuses (with their google.rpc details: BadRequest field violations,
  RetryInfo) and terminal request states → ``GatewayError`` (HTTP status, machine-readable
  code, message, field, Retry-After), rendered in Ollama's ``{"error": ...}`` or OpenAI's
  ``{"error": {"message", "type", "param", "code"}}`` shape.

Parsers raise ``GatewayError`` (status 400, ``field`` named) for bad input.
"""

from __future__ import annotations

import base64
import json
import math
import re
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import grpc
from google.protobuf import json_format, struct_pb2

from usher.errors import status_details
from usher.structs import dict_to_struct, plain_json
from usher.v1 import request_pb2, scheduler_pb2

__all__ = [
    "EMPTY_MODEL",
    "INT32",
    "INT64",
    "INVALID_MODEL",
    "MAX_JSON_DEPTH",
    "Api",
    "GatewayError",
    "OpenAIFrames",
    "Parsed",
    "RequestControls",
    "apply_controls",
    "bad_request",
    "decode_json",
    "error_from_request",
    "error_from_rpc",
    "finish_reason",
    "http_field",
    "is_model_name",
    "json_problem",
    "ollama_chat",
    "ollama_chunk",
    "ollama_embed",
    "ollama_embed_response",
    "ollama_embeddings",
    "ollama_embeddings_response",
    "ollama_error_body",
    "ollama_final",
    "ollama_generate",
    "ollama_metrics",
    "ollama_shortcut_final",
    "ollama_timestamp",
    "openai_chat",
    "openai_chunk",
    "openai_completion",
    "openai_embeddings",
    "openai_embeddings_response",
    "openai_error_body",
    "openai_status",
    "openai_text_chunk",
    "openai_text_completion",
    "openai_text_completion_body",
    "openai_tool_calls",
    "openai_usage",
    "parse_controls",
    "plain_json",
    "queue_wait_ms",
    "result_message",
]

Api = Literal["ollama", "openai"]
Kind = Literal["chat", "generate", "embed", "embeddings"]

#: Ollama's answers for a missing and a malformed model name.
EMPTY_MODEL = "model is required"
INVALID_MODEL = "invalid model name"

# The Scheduler's model-name rule (services.scheduler.admission.MODEL_NAME).
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-/]{0,199}(:[A-Za-z0-9._\-]{1,100})?")
_PRIORITIES: Mapping[str, request_pb2.Priority.ValueType] = {
    "critical": request_pb2.PRIORITY_CRITICAL,
    "high": request_pb2.PRIORITY_HIGH,
    "normal": request_pb2.PRIORITY_NORMAL,
    "low": request_pb2.PRIORITY_LOW,
    "batch": request_pb2.PRIORITY_BATCH,
}
_FALLBACKS: Mapping[str, request_pb2.FallbackPolicy.ValueType] = {
    "none": request_pb2.FALLBACK_POLICY_NONE,
    "after_timeout": request_pb2.FALLBACK_POLICY_AFTER_TIMEOUT,
    "local_only": request_pb2.FALLBACK_POLICY_LOCAL_ONLY,
}
_ROLES = frozenset({"system", "user", "assistant", "tool"})
#: Ollama request fields that travel as ``GenerationOptions.extra`` and that the Pool puts
#: back at the top level of the model server's request.
_TOP_LEVEL_EXTRA = ("think", "truncate", "shift", "logprobs", "top_logprobs")
_OPENAI_EXTRA_OPTIONS = ("presence_penalty", "frequency_penalty")
_MAX_QUEUE_TIMEOUT_SECONDS = 24 * 3600.0


# -- errors ------------------------------------------------------------------------------


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


# -- headers -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestControls:
    """What the ``X-Usher-*`` (and a few standard) headers ask for."""

    priority: request_pb2.Priority.ValueType = request_pb2.PRIORITY_UNSPECIFIED
    fallback: request_pb2.FallbackPolicy.ValueType = request_pb2.FALLBACK_POLICY_UNSPECIFIED
    queue_timeout_seconds: float | None = None
    deadline_seconds: float | None = None
    idempotency_key: str = ""
    traceparent: str = ""


def _seconds_header(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise bad_request(name, f"{raw[:40]!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise bad_request(name, "must be a positive number of seconds")
    if value > _MAX_QUEUE_TIMEOUT_SECONDS:
        raise bad_request(name, "must be at most 86400 seconds")
    return value


def parse_controls(headers: Mapping[str, str]) -> RequestControls:
    """``X-Usher-Priority``, ``X-Usher-Fallback``, ``X-Usher-Queue-Timeout``,
    ``X-Usher-Deadline`` (seconds), ``Idempotency-Key``, ``traceparent``.

    ``headers`` must look names up case-insensitively (aiohttp's and httpx's do).
    """
    priority = request_pb2.PRIORITY_UNSPECIFIED
    raw = headers.get("X-Usher-Priority", "").strip().lower()
    if raw:
        if raw not in _PRIORITIES:
            raise bad_request("X-Usher-Priority", f"must be one of {', '.join(_PRIORITIES)}")
        priority = _PRIORITIES[raw]
    fallback = request_pb2.FALLBACK_POLICY_UNSPECIFIED
    raw = headers.get("X-Usher-Fallback", "").strip().lower().replace("-", "_")
    if raw:
        if raw not in _FALLBACKS:
            raise bad_request("X-Usher-Fallback", f"must be one of {', '.join(_FALLBACKS)}")
        fallback = _FALLBACKS[raw]
    timeout = headers.get("X-Usher-Queue-Timeout", "").strip()
    deadline = headers.get("X-Usher-Deadline", "").strip()
    key = headers.get("Idempotency-Key", "").strip()
    if key and not re.fullmatch(r"[\x21-\x7e]{1,128}", key):
        raise bad_request("Idempotency-Key", "must be 1-128 printable ASCII characters")
    return RequestControls(
        priority=priority,
        fallback=fallback,
        queue_timeout_seconds=_seconds_header("X-Usher-Queue-Timeout", timeout)
        if timeout
        else None,
        deadline_seconds=_seconds_header("X-Usher-Deadline", deadline) if deadline else None,
        idempotency_key=key,
        traceparent=headers.get("traceparent", "").strip()[:128],
    )


def apply_controls(
    submit: scheduler_pb2.SubmitRequest, controls: RequestControls, now: float
) -> None:
    """Copy the header controls onto a Submit (``now`` in seconds since the epoch)."""
    submit.priority = controls.priority
    submit.fallback_policy = controls.fallback
    if controls.queue_timeout_seconds is not None:
        submit.queue_timeout.FromMilliseconds(round(controls.queue_timeout_seconds * 1000))
    if controls.deadline_seconds is not None:
        submit.deadline.FromMilliseconds(round((now + controls.deadline_seconds) * 1000))
    if controls.idempotency_key:
        submit.idempotency_key = controls.idempotency_key
    if controls.traceparent:
        submit.traceparent = controls.traceparent


# -- request bodies ------------------------------------------------------------------------


@dataclass
class Parsed:
    """A decoded request body: the Submit to send and how to answer."""

    submit: scheduler_pb2.SubmitRequest
    #: The model as the client named it (echoed back in answers).
    model: str
    kind: Kind
    stream: bool = False
    #: Ollama's load / unload requests (empty prompt), answered without queueing.
    shortcut: str = ""
    include_usage: bool = False
    encoding_format: str = "float"
    extra: dict[str, Any] = field(default_factory=dict)


#: Deepest nesting a request body may have (tools' schemas and options included).
MAX_JSON_DEPTH = 32


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def json_problem(value: Any, max_depth: int = MAX_JSON_DEPTH) -> tuple[str, str] | None:
    """The first part of decoded JSON the services cannot take, as (field path, what is
    wrong): nesting deeper than ``max_depth``, a number that is not finite or beyond 64
    bits, or a string with a lone surrogate (not UTF-8). None when all is well. Walks
    without recursion, so any depth is safe to check."""
    stack: list[tuple[str, Any, int]] = [("", value, 0)]
    while stack:
        path, item, depth = stack.pop()
        if depth > max_depth:
            return path or "body", f"nests deeper than {max_depth} levels"
        if isinstance(item, dict):
            for key, child in item.items():
                problem = _text_problem(key)
                if problem:
                    return path or "body", f"has a key that {problem}"
                stack.append((f"{path}.{key}" if path else key, child, depth + 1))
        elif isinstance(item, list):
            stack += [(f"{path}[{i}]", child, depth + 1) for i, child in enumerate(item)]
        elif isinstance(item, str):
            problem = _text_problem(item)
            if problem:
                return path or "body", problem
        elif isinstance(item, float) and not math.isfinite(item):
            return path or "body", "must be a finite number"
        elif isinstance(item, int) and not isinstance(item, bool) and abs(item) >= 2**64:
            return path or "body", "is out of range"
    return None


def _text_problem(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (a lone surrogate)"
    return ""


def decode_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 naming the body (or the field at fault)."""
    if not raw.strip():
        raise bad_request("body", "missing request body")
    try:
        value = json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request("body", f"invalid JSON: {exc}") from None
    except RecursionError:
        raise bad_request("body", f"nests deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(value, dict):
        raise bad_request("body", "must be a JSON object")
    problem = json_problem(value)
    if problem is not None:
        raise bad_request(*problem)
    return value


def is_model_name(name: str) -> bool:
    return _MODEL_NAME.fullmatch(name) is not None


def _model(body: Mapping[str, Any], *, aliases: Sequence[str] = ()) -> str:
    value: Any = body.get("model")
    for alias in aliases:
        if not value:
            value = body.get(alias)
    if value is None or value == "":
        raise GatewayError(400, "invalid_request", EMPTY_MODEL, field="model")
    if not isinstance(value, str):
        raise bad_request("model", "must be a string")
    if not is_model_name(value.strip()):
        raise GatewayError(400, "invalid_request", INVALID_MODEL, field="model")
    return value.strip()


def _string(body: Mapping[str, Any], name: str, where: str = "") -> str:
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise bad_request(where + name, "must be a string")
    return value


def _bool(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(name, "must be true or false")
    return value


INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)


def _integer(value: Any, where: str, bounds: tuple[int, int] = INT32) -> int:
    """A whole number within ``bounds`` (the protobuf field's range), else a 400 naming it."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request(where, "must be a number")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise bad_request(where, "must be an integer")
    number = int(value)
    low, high = bounds
    if not low <= number <= high:
        raise bad_request(where, f"must be between {low} and {high}")
    return number


def _number(value: Any, where: str, *, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request(where, "must be a number")
    if isinstance(value, int) and not INT64[0] <= value <= INT64[1]:
        raise bad_request(where, "is out of range")
    if not math.isfinite(value):
        raise bad_request(where, "must be finite")
    if integer and float(value) != int(value):
        raise bad_request(where, "must be an integer")
    return float(value)


def _strings(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise bad_request(where, "must be a string or a list of strings")


def _images(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad_request(where, "must be a list of base64 strings")
    return list(value)


def _format(value: Any, where: str = "format") -> str:
    """Ollama's ``format``: "json", a JSON schema object, or nothing."""
    if value is None or value == "":
        return ""
    if value == "json":
        return "json"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    raise bad_request(where, 'must be "json" or a JSON schema object')


_TYPED_INT_OPTIONS = ("seed", "num_predict", "num_ctx", "top_k")
_TYPED_FLOAT_OPTIONS = ("temperature", "top_p")


def _ollama_options(raw: Any, top: Mapping[str, Any]) -> request_pb2.GenerationOptions:
    options = request_pb2.GenerationOptions()
    extra: dict[str, Any] = {}
    if raw is not None:
        if not isinstance(raw, dict):
            raise bad_request("options", "must be an object")
        for key, value in raw.items():
            where = f"options.{key}"
            if value is None:
                continue
            if key in _TYPED_INT_OPTIONS:
                number = _integer(value, where, INT64 if key == "seed" else INT32)
                if key == "num_ctx" and number < 1:
                    raise bad_request(where, "must be positive")
                setattr(options, key, number)
            elif key in _TYPED_FLOAT_OPTIONS:
                setattr(options, key, _number(value, where))
            elif key == "stop":
                options.stop.extend(_strings(value, where))
            else:
                extra[str(key)] = value
    for key in _TOP_LEVEL_EXTRA:
        if top.get(key) is not None:
            extra[key] = top[key]
    if extra:
        options.extra.CopyFrom(dict_to_struct(extra))
    return options


def _ollama_messages(raw: Any) -> list[request_pb2.ChatMessage]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise bad_request("messages", "must be a list of messages")
    out: list[request_pb2.ChatMessage] = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(where, "must be an object")
        role = _string(message, "role", where + ".").lower()
        if role not in _ROLES:
            raise bad_request(f"{where}.role", f"must be one of {', '.join(sorted(_ROLES))}")
        out.append(
            request_pb2.ChatMessage(
                role=role,
                content=_string(message, "content", where + "."),
                images=_images(message.get("images"), f"{where}.images"),
            )
        )
    return out


def _tools(raw: Any) -> list[struct_pb2.Struct]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise bad_request("tools", "must be a list of objects")
    return [dict_to_struct(t) for t in raw]


def ollama_chat(body: Mapping[str, Any]) -> Parsed:
    model = _model(body)
    messages = _ollama_messages(body.get("messages"))
    submit = scheduler_pb2.SubmitRequest(
        model=model,
        chat=request_pb2.ChatInput(
            messages=messages, format=_format(body.get("format")), tools=_tools(body.get("tools"))
        ),
        options=_ollama_options(body.get("options"), body),
    )
    parsed = Parsed(submit, model, "chat", stream=_bool(body, "stream", True))
    if not messages:
        parsed.shortcut = "unload" if body.get("keep_alive") in (0, "0", "0s") else "load"
    return parsed


def ollama_generate(body: Mapping[str, Any]) -> Parsed:
    model = _model(body)
    prompt = _string(body, "prompt")
    images = _images(body.get("images"), "images")
    submit = scheduler_pb2.SubmitRequest(
        model=model,
        generate=request_pb2.GenerateInput(
            prompt=prompt,
            system=_string(body, "system"),
            suffix=_string(body, "suffix"),
            images=images,
            format=_format(body.get("format")),
            raw=_bool(body, "raw", False),
        ),
        options=_ollama_options(body.get("options"), body),
    )
    parsed = Parsed(submit, model, "generate", stream=_bool(body, "stream", True))
    if not prompt and not images:
        parsed.shortcut = "unload" if body.get("keep_alive") in (0, "0", "0s") else "load"
    return parsed


def _embed_options(body: Mapping[str, Any]) -> request_pb2.GenerationOptions:
    return _ollama_options(body.get("options"), {})


def ollama_embed(body: Mapping[str, Any]) -> Parsed:
    model = _model(body)
    raw = body.get("input")
    inputs = [] if raw is None or raw == "" else _strings(raw, "input")
    dimensions = body.get("dimensions")
    submit = scheduler_pb2.SubmitRequest(
        model=model,
        embed=request_pb2.EmbedInput(
            input=inputs,
            # Ollama truncates over-long input unless told not to.
            truncate=_bool(body, "truncate", True),
            dimensions=_integer(dimensions, "dimensions") if dimensions is not None else 0,
        ),
        options=_embed_options(body),
    )
    parsed = Parsed(submit, model, "embed")
    if not inputs:
        parsed.shortcut = "load"
    return parsed


def ollama_embeddings(body: Mapping[str, Any]) -> Parsed:
    """The legacy ``/api/embeddings`` (``prompt`` → ``embedding``)."""
    model = _model(body)
    prompt = _string(body, "prompt")
    submit = scheduler_pb2.SubmitRequest(
        model=model,
        embed=request_pb2.EmbedInput(input=[prompt] if prompt else [], truncate=True),
        options=_embed_options(body),
    )
    parsed = Parsed(submit, model, "embeddings")
    if not prompt:
        parsed.shortcut = "load"
    return parsed


def _data_url_image(url: str, where: str) -> str:
    if url.startswith("data:"):
        _, _, payload = url.partition(",")
        if ";base64" not in url.split(",", 1)[0] or not payload:
            raise bad_request(where, "only base64 data: URLs are supported")
        return payload
    raise bad_request(where, "only base64 data: URLs are supported, not remote images")


def _openai_messages(raw: Any) -> list[request_pb2.ChatMessage]:
    if not isinstance(raw, list) or not raw:
        raise bad_request("messages", "must be a non-empty list of messages")
    out: list[request_pb2.ChatMessage] = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(where, "must be an object")
        role = _string(message, "role", where + ".").lower()
        if role == "developer":
            role = "system"
        if role not in _ROLES:
            raise bad_request(
                f"{where}.role", "must be one of system, developer, user, assistant, tool"
            )
        content = message.get("content")
        if content is None or isinstance(content, str):
            out.append(request_pb2.ChatMessage(role=role, content=content or ""))
            continue
        if not isinstance(content, list):
            raise bad_request(f"{where}.content", "must be a string or a list of parts")
        # As Ollama's OpenAI layer does: each part becomes a message of its own.
        for j, part in enumerate(content):
            part_where = f"{where}.content[{j}]"
            if not isinstance(part, dict):
                raise bad_request(part_where, "must be an object")
            kind = part.get("type")
            if kind == "text":
                out.append(
                    request_pb2.ChatMessage(role=role, content=_string(part, "text", part_where))
                )
            elif kind == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, dict) else image
                if not isinstance(url, str):
                    raise bad_request(f"{part_where}.image_url", "must carry a url")
                out.append(
                    request_pb2.ChatMessage(
                        role=role, images=[_data_url_image(url, f"{part_where}.image_url")]
                    )
                )
            else:
                raise bad_request(f"{part_where}.type", "must be text or image_url")
    return out


def _openai_format(raw: Any) -> str:
    if raw is None:
        return ""
    if not isinstance(raw, dict):
        raise bad_request("response_format", "must be an object")
    kind = raw.get("type")
    if kind in (None, "text"):
        return ""
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        schema = raw.get("json_schema")
        inner = schema.get("schema") if isinstance(schema, dict) else None
        if not isinstance(inner, dict):
            raise bad_request("response_format.json_schema.schema", "must be an object")
        return json.dumps(inner, separators=(",", ":"))
    raise bad_request("response_format.type", "must be text, json_object or json_schema")


def _openai_options(body: Mapping[str, Any]) -> request_pb2.GenerationOptions:
    """Sampling options shared by chat and (legacy) text completions."""
    n = body.get("n")
    if n is not None and n != 1:
        raise bad_request("n", "only n=1 is supported")
    options = request_pb2.GenerationOptions()
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            setattr(options, name, _number(body[name], name))
    if body.get("seed") is not None:
        options.seed = _integer(body["seed"], "seed", INT64)
    for name in ("max_completion_tokens", "max_tokens"):
        if body.get(name) is not None:
            limit = _integer(body[name], name)
            if limit < 1:
                raise bad_request(name, "must be at least 1")
            options.num_predict = limit
            break
    if body.get("stop") is not None:
        options.stop.extend(_strings(body["stop"], "stop"))
    extra = {k: body[k] for k in _OPENAI_EXTRA_OPTIONS if body.get(k) is not None}
    for key, value in extra.items():
        _number(value, key)
    if extra:
        options.extra.CopyFrom(dict_to_struct(extra))
    return options


def _openai_streaming(body: Mapping[str, Any]) -> tuple[bool, bool]:
    """``stream`` and ``stream_options.include_usage``."""
    stream = _bool(body, "stream", False)
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise bad_request("stream_options", "must be an object")
    return stream, bool(stream_options and stream_options.get("include_usage") is True)


def openai_chat(body: Mapping[str, Any]) -> Parsed:
    model = _model(body)
    messages = _openai_messages(body.get("messages"))
    options = _openai_options(body)
    stream, include_usage = _openai_streaming(body)
    submit = scheduler_pb2.SubmitRequest(
        model=model,
        chat=request_pb2.ChatInput(
            messages=messages,
            format=_openai_format(body.get("response_format")),
            tools=_tools(body.get("tools")),
        ),
        options=options,
    )
    return Parsed(submit, model, "chat", stream=stream, include_usage=include_usage)


def openai_text_completion(body: Mapping[str, Any]) -> Parsed:
    """The legacy ``/v1/completions``: one prompt (a string, or a list of one), raw text."""
    model = _model(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request("prompt", "must be a string (token arrays and batches are not supported)")
    if body.get("echo") is True:
        raise bad_request("echo", "is not supported")
    options = _openai_options(body)
    stream, include_usage = _openai_streaming(body)
    submit = scheduler_pb2.SubmitRequest(
        model=model,
        generate=request_pb2.GenerateInput(prompt=prompt, suffix=_string(body, "suffix")),
        options=options,
    )
    return Parsed(submit, model, "generate", stream=stream, include_usage=include_usage)


def openai_embeddings(body: Mapping[str, Any]) -> Parsed:
    model = _model(body)
    raw = body.get("input")
    if raw is None or raw == [] or raw == "":
        raise bad_request("input", "must not be empty")
    if isinstance(raw, list) and raw and not all(isinstance(x, str) for x in raw):
        raise bad_request("input", "token arrays are not supported; send text")
    inputs = _strings(raw, "input")
    fmt = _string(body, "encoding_format").lower() or "float"
    if fmt not in ("float", "base64"):
        raise bad_request("encoding_format", "must be float or base64")
    dimensions = body.get("dimensions")
    submit = scheduler_pb2.SubmitRequest(
        model=model,
        embed=request_pb2.EmbedInput(
            input=inputs,
            truncate=True,
            dimensions=_integer(dimensions, "dimensions") if dimensions is not None else 0,
        ),
    )
    return Parsed(submit, model, "embed", encoding_format=fmt)


# -- answers: shared ---------------------------------------------------------------------


def result_message(request: request_pb2.LlmRequest) -> dict[str, Any]:
    """The assistant message of a finished chat, in the model server's JSON shape."""
    if request.result.HasField("message"):
        message = plain_json(json_format.MessageToDict(request.result.message))
        if isinstance(message, dict):
            server_content = str(message.pop("content", "") or "")
            content = request.result.text or server_content
            role = str(message.pop("role", "") or "assistant")
            return {"role": role, "content": content, **message}
    return {"role": "assistant", "content": request.result.text}


def queue_wait_ms(request: request_pb2.LlmRequest, now: float | None = None) -> int:
    """How long the request waited in the queue (so far, while it still waits)."""
    if request.usage.HasField("queue_wait"):
        return request.usage.queue_wait.ToMilliseconds()
    created = request.created_at.ToMilliseconds() if request.HasField("created_at") else 0
    if not created:
        return 0
    if request.HasField("started_at"):
        return max(0, request.started_at.ToMilliseconds() - created)
    return max(0, int((time.time() if now is None else now) * 1000) - created)


def finish_reason(done_reason: str, has_tool_calls: bool = False) -> str:
    if has_tool_calls:
        return "tool_calls"
    return done_reason if done_reason in ("stop", "length") else "stop"


# -- answers: Ollama ---------------------------------------------------------------------


def ollama_timestamp(now: datetime | None = None) -> str:
    """RFC 3339 in UTC with a ``Z``, as Go prints ``created_at``."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


def ollama_metrics(request: request_pb2.LlmRequest) -> dict[str, int]:
    """Ollama's timing fields in nanoseconds, zero values left out (``omitempty``).

    ``total_duration`` includes the queue wait, as Ollama's does (its clock starts when the
    request arrives); ``eval_duration`` comes from the tokens-per-second figure and
    ``prompt_eval_duration`` is the rest of the processing after the load.
    """
    usage = request.usage
    processing = usage.processing.ToNanoseconds()
    load = usage.load.ToNanoseconds()
    wait = usage.queue_wait.ToNanoseconds()
    tokens = int(usage.completion_tokens)
    eval_ns = round(tokens / usage.tokens_per_second * 1e9) if usage.tokens_per_second > 0 else 0
    eval_ns = min(eval_ns, max(0, processing - load)) if processing else eval_ns
    prompt_ns = max(0, processing - load - eval_ns)
    values = {
        "total_duration": wait + processing,
        "load_duration": load,
        "prompt_eval_count": int(usage.prompt_tokens),
        "prompt_eval_duration": prompt_ns,
        "eval_count": tokens,
        "eval_duration": eval_ns,
    }
    return {k: v for k, v in values.items() if v}


def ollama_chunk(kind: Kind, model: str, text: str, now: datetime | None = None) -> dict[str, Any]:
    """One streamed NDJSON object (``done: false``)."""
    out: dict[str, Any] = {"model": model, "created_at": ollama_timestamp(now)}
    if kind == "chat":
        out["message"] = {"role": "assistant", "content": text}
    else:
        out["response"] = text
    out["done"] = False
    return out


def ollama_final(
    kind: Kind,
    model: str,
    request: request_pb2.LlmRequest,
    *,
    stream: bool,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The last object: the whole answer when not streaming, empty text when streaming
    (tool calls of a chat ride on it either way)."""
    out: dict[str, Any] = {"model": model, "created_at": ollama_timestamp(now)}
    if kind == "chat":
        message = result_message(request)
        if stream:
            message["content"] = ""
            message.pop("thinking", None)
        out["message"] = message
    else:
        out["response"] = "" if stream else request.result.text
    out["done"] = True
    out["done_reason"] = request.result.done_reason or "stop"
    out.update(ollama_metrics(request))
    return out


def ollama_shortcut_final(
    kind: Kind, model: str, reason: str, now: datetime | None = None
) -> dict[str, Any]:
    """The answer to a load / unload request (empty prompt)."""
    if kind in ("embed", "embeddings"):
        return {"model": model, "embeddings": []} if kind == "embed" else {"embedding": []}
    out: dict[str, Any] = {"model": model, "created_at": ollama_timestamp(now)}
    if kind == "chat":
        out["message"] = {"role": "assistant", "content": ""}
    else:
        out["response"] = ""
    out["done"] = True
    out["done_reason"] = reason
    return out


def _vectors(request: request_pb2.LlmRequest) -> list[list[float]]:
    return [list(e.values) for e in request.result.embeddings]


def ollama_embed_response(model: str, request: request_pb2.LlmRequest) -> dict[str, Any]:
    out: dict[str, Any] = {"model": model, "embeddings": _vectors(request)}
    usage = request.usage
    total = usage.queue_wait.ToNanoseconds() + usage.processing.ToNanoseconds()
    if total:
        out["total_duration"] = total
    if usage.load.ToNanoseconds():
        out["load_duration"] = usage.load.ToNanoseconds()
    if usage.prompt_tokens:
        out["prompt_eval_count"] = int(usage.prompt_tokens)
    return out


def ollama_embeddings_response(request: request_pb2.LlmRequest) -> dict[str, Any]:
    vectors = _vectors(request)
    return {"embedding": vectors[0] if vectors else []}


# -- answers: OpenAI ---------------------------------------------------------------------


def openai_usage(request: request_pb2.LlmRequest) -> dict[str, int]:
    prompt = int(request.usage.prompt_tokens)
    completion = int(request.usage.completion_tokens)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def openai_tool_calls(message: Mapping[str, Any], request_id: str) -> list[dict[str, Any]]:
    """Ollama's ``tool_calls`` (arguments as an object) → OpenAI's (arguments as text)."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return []
    out: list[dict[str, Any]] = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        arguments = function.get("arguments", {})
        out.append(
            {
                "id": str(call.get("id") or f"call_{request_id[-8:]}_{i}"),
                "index": i,
                "type": "function",
                "function": {
                    "name": str(function.get("name", "")),
                    "arguments": arguments
                    if isinstance(arguments, str)
                    else json.dumps(arguments, separators=(",", ":")),
                },
            }
        )
    return out


def openai_chunk(
    completion_id: str,
    created: int,
    model: str,
    delta: Mapping[str, Any],
    finish: str | None = None,
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": "fp_usher",
        "choices": [{"index": 0, "delta": dict(delta), "finish_reason": finish}],
    }


def openai_completion(
    completion_id: str, created: int, model: str, request: request_pb2.LlmRequest
) -> dict[str, Any]:
    message = result_message(request)
    calls = openai_tool_calls(message, request.id)
    answer: dict[str, Any] = {"role": "assistant", "content": request.result.text}
    if calls:
        answer["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": "fp_usher",
        "choices": [
            {
                "index": 0,
                "message": answer,
                "finish_reason": finish_reason(request.result.done_reason, bool(calls)),
            }
        ],
        "usage": openai_usage(request),
    }


@dataclass(frozen=True)
class OpenAIFrames:
    """The SSE events of one streamed OpenAI answer (chat chunks, or the legacy text
    completion's pieces); ``[DONE]`` follows the ending."""

    completion_id: str
    created: int
    model: str
    include_usage: bool = False
    text_completion: bool = False

    def _frame(self, delta: Mapping[str, Any], finish: str | None = None) -> dict[str, Any]:
        if self.text_completion:
            text = str(delta.get("content", ""))
            return openai_text_chunk(self.completion_id, self.created, self.model, text, finish)
        return openai_chunk(self.completion_id, self.created, self.model, delta, finish)

    def opening(self) -> list[dict[str, Any]]:
        """When the model starts: a chat names the assistant's role first."""
        return [] if self.text_completion else [self._frame({"role": "assistant", "content": ""})]

    def text(self, text: str) -> dict[str, Any]:
        return self._frame({"content": text})

    def ending(self, done: request_pb2.LlmRequest) -> list[dict[str, Any]]:
        """Tool calls (chat), the finish reason, usage when asked for."""
        calls = [] if self.text_completion else openai_tool_calls(result_message(done), done.id)
        out = [self._frame({"tool_calls": calls})] if calls else []
        out.append(self._frame({}, finish_reason(done.result.done_reason, bool(calls))))
        if self.include_usage:
            usage = self._frame({})
            usage["choices"] = []
            usage["usage"] = openai_usage(done)
            out.append(usage)
        return out


def openai_text_chunk(
    completion_id: str, created: int, model: str, text: str, finish: str | None = None
) -> dict[str, Any]:
    """One streamed piece of a legacy text completion."""
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": "fp_usher",
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }


def openai_text_completion_body(
    completion_id: str, created: int, model: str, request: request_pb2.LlmRequest
) -> dict[str, Any]:
    body = openai_text_chunk(
        completion_id,
        created,
        model,
        request.result.text,
        finish_reason(request.result.done_reason),
    )
    body["usage"] = openai_usage(request)
    return body


def openai_embeddings_response(
    model: str, request: request_pb2.LlmRequest, encoding_format: str
) -> dict[str, Any]:
    data: list[dict[str, Any]] = []
    for i, vector in enumerate(_vectors(request)):
        value: Any = vector
        if encoding_format == "base64":
            value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "embedding": value, "index": i})
    tokens = int(request.usage.prompt_tokens)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
