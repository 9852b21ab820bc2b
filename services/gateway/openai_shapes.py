"""OpenAI's API in Usher's terms (pure): ``/v1/chat/completions``, ``/v1/completions`` and
``/v1/embeddings`` bodies → ``SubmitRequest``; a finished request and streamed text →
chat completion (chunk) objects, the legacy text completion's, and embeddings (``float``
or ``base64``). The routes are in ``openai_http``.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.gateway import bodies
from services.gateway.errors import bad_request
from usher.structs import dict_to_struct
from usher.v1 import request_pb2, scheduler_pb2

__all__ = [
    "OpenAIFrames",
    "finish_reason",
    "openai_chat",
    "openai_chunk",
    "openai_completion",
    "openai_embeddings",
    "openai_embeddings_response",
    "openai_text_chunk",
    "openai_text_completion",
    "openai_text_completion_body",
    "openai_tool_calls",
    "openai_usage",
]

_OPENAI_EXTRA_OPTIONS = ("presence_penalty", "frequency_penalty")


# -- requests ----------------------------------------------------------------------------


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
        role = bodies.string_field(message, "role", where + ".").lower()
        if role == "developer":
            role = "system"
        if role not in bodies.ROLES:
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
                    request_pb2.ChatMessage(
                        role=role, content=bodies.string_field(part, "text", part_where)
                    )
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
            setattr(options, name, bodies.number_field(body[name], name))
    if body.get("seed") is not None:
        options.seed = bodies.integer_field(body["seed"], "seed", bodies.INT64)
    for name in ("max_completion_tokens", "max_tokens"):
        if body.get(name) is not None:
            limit = bodies.integer_field(body[name], name)
            if limit < 1:
                raise bad_request(name, "must be at least 1")
            options.num_predict = limit
            break
    if body.get("stop") is not None:
        options.stop.extend(bodies.strings_field(body["stop"], "stop"))
    extra = {k: body[k] for k in _OPENAI_EXTRA_OPTIONS if body.get(k) is not None}
    for key, value in extra.items():
        bodies.number_field(value, key)
    if extra:
        options.extra.CopyFrom(dict_to_struct(extra))
    return options


def _openai_streaming(body: Mapping[str, Any]) -> tuple[bool, bool]:
    """``stream`` and ``stream_options.include_usage``."""
    stream = bodies.bool_field(body, "stream", False)
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise bad_request("stream_options", "must be an object")
    return stream, bool(stream_options and stream_options.get("include_usage") is True)


def openai_chat(body: Mapping[str, Any]) -> bodies.Parsed:
    model = bodies.model_field(body)
    messages = _openai_messages(body.get("messages"))
    options = _openai_options(body)
    stream, include_usage = _openai_streaming(body)
    submit = scheduler_pb2.SubmitRequest(
        model=model,
        chat=request_pb2.ChatInput(
            messages=messages,
            format=_openai_format(body.get("response_format")),
            tools=bodies.tools_field(body.get("tools")),
        ),
        options=options,
    )
    return bodies.Parsed(submit, model, "chat", stream=stream, include_usage=include_usage)


def openai_text_completion(body: Mapping[str, Any]) -> bodies.Parsed:
    """The legacy ``/v1/completions``: one prompt (a string, or a list of one), raw text."""
    model = bodies.model_field(body)
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
        generate=request_pb2.GenerateInput(
            prompt=prompt, suffix=bodies.string_field(body, "suffix")
        ),
        options=options,
    )
    return bodies.Parsed(submit, model, "generate", stream=stream, include_usage=include_usage)


def openai_embeddings(body: Mapping[str, Any]) -> bodies.Parsed:
    model = bodies.model_field(body)
    raw = body.get("input")
    if raw is None or raw == [] or raw == "":
        raise bad_request("input", "must not be empty")
    if isinstance(raw, list) and raw and not all(isinstance(x, str) for x in raw):
        raise bad_request("input", "token arrays are not supported; send text")
    inputs = bodies.strings_field(raw, "input")
    fmt = bodies.string_field(body, "encoding_format").lower() or "float"
    if fmt not in ("float", "base64"):
        raise bad_request("encoding_format", "must be float or base64")
    dimensions = body.get("dimensions")
    submit = scheduler_pb2.SubmitRequest(
        model=model,
        embed=request_pb2.EmbedInput(
            input=inputs,
            truncate=True,
            dimensions=bodies.integer_field(dimensions, "dimensions")
            if dimensions is not None
            else 0,
        ),
    )
    return bodies.Parsed(submit, model, "embed", encoding_format=fmt)


# -- answers -------------------------------------------------------------------------------


def finish_reason(done_reason: str, has_tool_calls: bool = False) -> str:
    if has_tool_calls:
        return "tool_calls"
    return done_reason if done_reason in ("stop", "length") else "stop"


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
    message = bodies.result_message(request)
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
        calls = (
            [] if self.text_completion else openai_tool_calls(bodies.result_message(done), done.id)
        )
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
    for i, vector in enumerate(bodies.embedding_vectors(request)):
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
