"""Ollama's API in Usher's terms (pure): ``/api/chat``, ``/api/generate``, ``/api/embed``
and ``/api/embeddings`` bodies → ``SubmitRequest``; a finished request and streamed text →
Ollama's NDJSON chunks and final object (Ollama's field names, nanosecond durations) and
its embedding answers. The routes are in ``ollama_http``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from services.gateway import bodies
from services.gateway.errors import bad_request
from usher.structs import dict_to_struct
from usher.v1 import request_pb2, scheduler_pb2

__all__ = [
    "ollama_chat",
    "ollama_chunk",
    "ollama_embed",
    "ollama_embed_response",
    "ollama_embeddings",
    "ollama_embeddings_response",
    "ollama_final",
    "ollama_generate",
    "ollama_metrics",
    "ollama_shortcut_final",
    "ollama_timestamp",
]

#: Ollama request fields that travel as ``GenerationOptions.extra`` and that the Pool puts
#: back at the top level of the model server's request.
_TOP_LEVEL_EXTRA = ("think", "truncate", "shift", "logprobs", "top_logprobs")


# -- requests ----------------------------------------------------------------------------


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
                number = bodies.integer_field(
                    value, where, bodies.INT64 if key == "seed" else bodies.INT32
                )
                if key == "num_ctx" and number < 1:
                    raise bad_request(where, "must be positive")
                setattr(options, key, number)
            elif key in _TYPED_FLOAT_OPTIONS:
                setattr(options, key, bodies.number_field(value, where))
            elif key == "stop":
                options.stop.extend(bodies.strings_field(value, where))
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
        role = bodies.string_field(message, "role", where + ".").lower()
        if role not in bodies.ROLES:
            raise bad_request(f"{where}.role", f"must be one of {', '.join(sorted(bodies.ROLES))}")
        out.append(
            request_pb2.ChatMessage(
                role=role,
                content=bodies.string_field(message, "content", where + "."),
                images=_images(message.get("images"), f"{where}.images"),
            )
        )
    return out


def ollama_chat(body: Mapping[str, Any]) -> bodies.Parsed:
    model = bodies.model_field(body)
    messages = _ollama_messages(body.get("messages"))
    submit = scheduler_pb2.SubmitRequest(
        model=model,
        chat=request_pb2.ChatInput(
            messages=messages,
            format=_format(body.get("format")),
            tools=bodies.tools_field(body.get("tools")),
        ),
        options=_ollama_options(body.get("options"), body),
    )
    parsed = bodies.Parsed(submit, model, "chat", stream=bodies.bool_field(body, "stream", True))
    if not messages:
        parsed.shortcut = "unload" if body.get("keep_alive") in (0, "0", "0s") else "load"
    return parsed


def ollama_generate(body: Mapping[str, Any]) -> bodies.Parsed:
    model = bodies.model_field(body)
    prompt = bodies.string_field(body, "prompt")
    images = _images(body.get("images"), "images")
    submit = scheduler_pb2.SubmitRequest(
        model=model,
        generate=request_pb2.GenerateInput(
            prompt=prompt,
            system=bodies.string_field(body, "system"),
            suffix=bodies.string_field(body, "suffix"),
            images=images,
            format=_format(body.get("format")),
            raw=bodies.bool_field(body, "raw", False),
        ),
        options=_ollama_options(body.get("options"), body),
    )
    parsed = bodies.Parsed(
        submit, model, "generate", stream=bodies.bool_field(body, "stream", True)
    )
    if not prompt and not images:
        parsed.shortcut = "unload" if body.get("keep_alive") in (0, "0", "0s") else "load"
    return parsed


def _embed_options(body: Mapping[str, Any]) -> request_pb2.GenerationOptions:
    return _ollama_options(body.get("options"), {})


def ollama_embed(body: Mapping[str, Any]) -> bodies.Parsed:
    model = bodies.model_field(body)
    raw = body.get("input")
    inputs = [] if raw is None or raw == "" else bodies.strings_field(raw, "input")
    dimensions = body.get("dimensions")
    submit = scheduler_pb2.SubmitRequest(
        model=model,
        embed=request_pb2.EmbedInput(
            input=inputs,
            # Ollama truncates over-long input unless told not to.
            truncate=bodies.bool_field(body, "truncate", True),
            dimensions=bodies.integer_field(dimensions, "dimensions")
            if dimensions is not None
            else 0,
        ),
        options=_embed_options(body),
    )
    parsed = bodies.Parsed(submit, model, "embed")
    if not inputs:
        parsed.shortcut = "load"
    return parsed


def ollama_embeddings(body: Mapping[str, Any]) -> bodies.Parsed:
    """The legacy ``/api/embeddings`` (``prompt`` → ``embedding``)."""
    model = bodies.model_field(body)
    prompt = bodies.string_field(body, "prompt")
    submit = scheduler_pb2.SubmitRequest(
        model=model,
        embed=request_pb2.EmbedInput(input=[prompt] if prompt else [], truncate=True),
        options=_embed_options(body),
    )
    parsed = bodies.Parsed(submit, model, "embeddings")
    if not prompt:
        parsed.shortcut = "load"
    return parsed


# -- answers -------------------------------------------------------------------------------


def ollama_timestamp(now: datetime | None = None) -> str:
    """RFC 3339 in UTC with a ``Z``, as Go prints ``created_at``."""
    if now is None:
        return _timestamp_now()
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


_second: tuple[int, str] = (-1, "")


def _timestamp_now() -> str:
    """The time now as ``ollama_timestamp`` writes it, the date and time of day formatted
    once a second (every streamed line carries one)."""
    global _second
    now = time.time()
    whole = int(now)
    if whole != _second[0]:
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{_second[1]}.{int((now - whole) * 1_000_000):06d}Z"


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


def ollama_chunk(
    kind: bodies.Kind, model: str, text: str, now: datetime | None = None
) -> dict[str, Any]:
    """One streamed NDJSON object (``done: false``)."""
    out: dict[str, Any] = {"model": model, "created_at": ollama_timestamp(now)}
    if kind == "chat":
        out["message"] = {"role": "assistant", "content": text}
    else:
        out["response"] = text
    out["done"] = False
    return out


def ollama_final(
    kind: bodies.Kind,
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
        message = bodies.result_message(request)
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
    kind: bodies.Kind, model: str, reason: str, now: datetime | None = None
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


def ollama_embed_response(model: str, request: request_pb2.LlmRequest) -> dict[str, Any]:
    out: dict[str, Any] = {"model": model, "embeddings": bodies.embedding_vectors(request)}
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
    vectors = bodies.embedding_vectors(request)
    return {"embedding": vectors[0] if vectors else []}
