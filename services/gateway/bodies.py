"""What both APIs' bodies share (pure): a decoded request (``Parsed``), the JSON checks
every body passes (depth, finite numbers, valid Unicode), the field checks both APIs'
parsers use (each bad value is a 400 naming its field), and the parts of a finished
request both render (the assistant message, the queue wait, embedding vectors).

The per-API parsers and renderers are in ``ollama_shapes`` and ``openai_shapes``.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from google.protobuf import json_format, struct_pb2

from services.gateway.errors import GatewayError, bad_request
from usher.structs import dict_to_struct, plain_json
from usher.v1 import request_pb2, scheduler_pb2

__all__ = [
    "EMPTY_MODEL",
    "INT32",
    "INT64",
    "INVALID_MODEL",
    "MAX_JSON_DEPTH",
    "ROLES",
    "Kind",
    "Parsed",
    "bool_field",
    "decode_json",
    "embedding_vectors",
    "integer_field",
    "is_model_name",
    "json_problem",
    "model_field",
    "number_field",
    "queue_wait_ms",
    "result_message",
    "string_field",
    "strings_field",
    "tools_field",
]

Kind = Literal["chat", "generate", "embed", "embeddings"]

#: Ollama's answers for a missing and a malformed model name.
EMPTY_MODEL = "model is required"
INVALID_MODEL = "invalid model name"

# The Scheduler's model-name rule (services.scheduler.admission.MODEL_NAME).
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-/]{0,199}(:[A-Za-z0-9._\-]{1,100})?")
ROLES = frozenset({"system", "user", "assistant", "tool"})


# -- requests ----------------------------------------------------------------------------


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


def model_field(body: Mapping[str, Any], *, aliases: Sequence[str] = ()) -> str:
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


def string_field(body: Mapping[str, Any], name: str, where: str = "") -> str:
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise bad_request(where + name, "must be a string")
    return value


def bool_field(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(name, "must be true or false")
    return value


INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)


def integer_field(value: Any, where: str, bounds: tuple[int, int] = INT32) -> int:
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


def number_field(value: Any, where: str, *, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request(where, "must be a number")
    if isinstance(value, int) and not INT64[0] <= value <= INT64[1]:
        raise bad_request(where, "is out of range")
    if not math.isfinite(value):
        raise bad_request(where, "must be finite")
    if integer and float(value) != int(value):
        raise bad_request(where, "must be an integer")
    return float(value)


def strings_field(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise bad_request(where, "must be a string or a list of strings")


def tools_field(raw: Any) -> list[struct_pb2.Struct]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise bad_request("tools", "must be a list of objects")
    return [dict_to_struct(t) for t in raw]


# -- answers -------------------------------------------------------------------------------


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


def embedding_vectors(request: request_pb2.LlmRequest) -> list[list[float]]:
    return [list(e.values) for e in request.result.embeddings]
