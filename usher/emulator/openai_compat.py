"""Ollama's OpenAI-compatible endpoints (``/v1/*``), as its ``middleware/openai.go``
renders them: the same scheduling as the native API, OpenAI-shaped bodies, SSE
streams ending in ``data: [DONE]``, and errors wrapped as
``{"error": {"message", "type", "param", "code"}}``.

Faithful quirk: an error in the middle of an SSE stream is not reported; Ollama
emits one empty delta chunk and ends the stream without ``[DONE]``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from usher.emulator import protocol
from usher.emulator.config import ModelSpec
from usher.emulator.engine import (
    ApiError,
    Done,
    GenerationJob,
    Metrics,
    Tokens,
)
from usher.emulator.httputil import (
    dumps,
    fail_generation,
    json_response,
    start_stream,
)
from usher.emulator.native import NativeApi, display_name, tool_arguments
from usher.emulator.scheduler import Lease
from usher.emulator.tools import ToolChoice, choose_tool, openai_tool_call

__all__ = ["OpenAIApi", "openai_error"]

SSE = "text/event-stream"
_FINGERPRINT = "fp_ollama"


def openai_error(status: int, message: str) -> web.Response:
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return json_response(
        {"error": {"message": message, "type": kind, "param": None, "code": None}}, status
    )


def _go_type(value: object) -> str:
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "float64"
    if isinstance(value, dict):
        return "map[string]interface {}"
    return type(value).__name__


def _usage(m: Metrics) -> dict[str, int]:
    return {
        "prompt_tokens": m.prompt_eval_count,
        "completion_tokens": m.eval_count,
        "total_tokens": m.prompt_eval_count + m.eval_count,
    }


def _sse(obj: Any) -> bytes:
    return f"data: {dumps(obj)}\n\n".encode()


class OpenAIApi:
    """The ``/v1`` routes of one instance, layered on the native handlers."""

    def __init__(self, native: NativeApi) -> None:
        self.native = native
        self.engine = native.engine

    def register(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/v1/chat/completions", self.chat_completions)
        r.add_post("/v1/completions", self.completions)
        r.add_post("/v1/embeddings", self.embeddings)
        r.add_get("/v1/models", self.models)
        r.add_get("/v1/models/{model:.+}", self.retrieve_model)

    async def _respond(
        self, handler: Callable[[], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        stats = self.engine.stats
        stats.requests_received += 1
        try:
            return await handler()
        except ApiError as exc:
            stats.requests_failed += 1
            return openai_error(exc.status, exc.message)

    # -- models -----------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        data = [
            {
                "id": spec.name,
                "object": "model",
                "created": int(spec.modified_at.timestamp()),
                "owned_by": "library",
            }
            for spec in self.engine.config.models
        ]
        # Go marshals an empty (nil) slice as null.
        return json_response({"object": "list", "data": data or None})

    async def retrieve_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        spec = self.engine.resolve(name)
        if spec is None:
            return openai_error(404, f"model '{display_name(name)}' not found")
        return json_response(
            {
                "id": name,
                "object": "model",
                "created": int(spec.modified_at.timestamp()),
                "owned_by": "library",
            }
        )

    # -- chat -------------------------------------------------------------------

    def _messages(self, raw: list[Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for msg in raw:
            if not isinstance(msg, Mapping):
                raise ApiError(
                    400,
                    "json: cannot unmarshal "
                    f"{protocol.json_kind(msg)} into Go struct field "
                    "ChatCompletionRequest.messages of type openai.Message",
                )
            role = str(msg.get("role") or "").lower()
            content = msg.get("content")
            if isinstance(content, str):
                out.append({"role": role, "content": content})
            elif isinstance(content, list):
                for part in content:
                    if not isinstance(part, Mapping):
                        raise ApiError(400, "invalid message format")
                    kind = part.get("type")
                    if kind == "text":
                        if not isinstance(part.get("text"), str):
                            raise ApiError(400, "invalid message format")
                        out.append({"role": role, "content": part["text"]})
                    elif kind in ("image_url", "input_audio"):
                        out.append({"role": role, "content": ""})
                    else:
                        raise ApiError(400, "invalid message format")
            elif msg.get("tool_calls") is not None:
                out.append({"role": role, "content": ""})
            else:
                raise ApiError(400, f"invalid message content type: {_go_type(content)}")
        return out

    @staticmethod
    def _format(body: Mapping[str, Any]) -> object:
        rf = body.get("response_format")
        if not isinstance(rf, Mapping):
            return None
        kind = str(rf.get("type") or "").strip().lower()
        if kind == "json_object":
            return "json"
        if kind == "json_schema":
            schema = rf.get("json_schema")
            if isinstance(schema, Mapping):
                return schema.get("schema")
        return None

    @staticmethod
    def _common(body: Mapping[str, Any], struct_name: str) -> tuple[bool, bool, int | None, int]:
        stream = protocol.typed_field(body, struct_name, "stream", "bool", "bool") is True
        opts = protocol.typed_field(
            body, struct_name, "stream_options", "object", "openai.StreamOptions"
        )
        include_usage = bool(isinstance(opts, Mapping) and opts.get("include_usage") is True)
        max_tokens = protocol.typed_field(body, struct_name, "max_tokens", "number", "int")
        seed = protocol.typed_field(body, struct_name, "seed", "number", "int")
        return (
            stream,
            include_usage,
            int(max_tokens) if max_tokens is not None else None,
            int(seed) if seed is not None else 0,
        )

    def _spec(self, name: str) -> ModelSpec:
        return self.native._resolve(name, empty=ApiError(400, "model is required"))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()

        async def run() -> web.StreamResponse:
            s = "ChatCompletionRequest"
            body = protocol.decode_body(await request.read(), s)
            model = protocol.str_field(body, s, "model")
            raw_messages = protocol.typed_field(body, s, "messages", "array", "[]openai.Message")
            stream, include_usage, max_tokens, seed = self._common(body, s)
            if not raw_messages:
                raise ApiError(400, "[] is too short - 'messages'")
            messages = self._messages(raw_messages)
            spec = self._spec(model)
            self.native._fail_if_armed()
            if "completion" not in spec.capabilities:
                raise ApiError(400, f"{protocol.go_quote(model)} does not support chat")
            engine = self.engine
            num_ctx = engine.default_num_ctx(spec, None)
            tools = body.get("tools")
            tool = choose_tool(tools if isinstance(tools, list) else None, messages)
            lease = await engine.acquire(spec, num_ctx=num_ctx, keep_alive=None, slot=True)
            try:
                job = GenerationJob(
                    spec=spec,
                    key=protocol.prompt_key(spec, "chat", json.dumps(messages)),
                    prompt_tokens=protocol.chat_prompt_tokens(messages),
                    num_predict=max_tokens,
                    seed=seed,
                    format=tool.schema if tool else self._format(body),
                    started=started,
                )
                return await self._render_chat(
                    request,
                    spec,
                    model,
                    job,
                    stream=stream,
                    include_usage=include_usage,
                    lease=lease,
                    tool=tool,
                )
            finally:
                engine.release(lease)

        return await self._respond(run)

    async def _render_chat(
        self,
        request: web.Request,
        spec: ModelSpec,
        model: str,
        job: GenerationJob,
        *,
        stream: bool,
        include_usage: bool,
        lease: Lease,
        tool: ToolChoice | None = None,
    ) -> web.StreamResponse:
        engine = self.engine
        model_stats = engine.stats.model(spec.name)
        frames = _ChatFrames(f"chatcmpl-{random.randrange(999)}", int(time.time()), model)
        resp: web.StreamResponse | None = None
        first = True
        events = engine.generate(job, lease)
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, Tokens):
                    if not stream or tool is not None:  # a call goes out whole, at the end
                        continue
                    parts = [
                        frames.text(text, first=first and i == 0)
                        for i, text in enumerate(event.texts)
                    ]
                    first = False
                    if resp is None:
                        resp = await start_stream(request, SSE)
                    await resp.write(b"".join(parts))
                elif isinstance(event, Done):
                    model_stats.completed += 1
                    engine.stats.requests_served += 1
                    calls = _tool_calls(tool, event.text)
                    if calls:
                        event = Done(text="", done_reason="tool_calls", metrics=event.metrics)
                    if not stream:
                        return json_response(frames.whole(event, calls))
                    if resp is None:
                        resp = await start_stream(request, SSE)
                    await resp.write(frames.ending(event, calls, first, include_usage))
                    await resp.write_eof()
                    return resp
                else:
                    # Ollama's ChatWriter decodes the error line as an empty chunk.
                    return await fail_generation(
                        request,
                        engine,
                        model_stats,
                        resp,
                        event,
                        lambda _: _sse(frames.chunk({"content": ""}, None)),
                    )
        raise ApiError(500, "generation ended without a result")

    # -- completions --------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()

        async def run() -> web.StreamResponse:
            s = "CompletionRequest"
            body = protocol.decode_body(await request.read(), s)
            model = protocol.str_field(body, s, "model")
            prompt = protocol.str_field(body, s, "prompt")
            stream, include_usage, max_tokens, seed = self._common(body, s)
            spec = self.native._resolve(model, empty=ApiError(404, f"model '{model}' not found"))
            self.native._fail_if_armed()
            if "completion" not in spec.capabilities:
                raise ApiError(400, f"{protocol.go_quote(model)} does not support generate")
            engine = self.engine
            num_ctx = engine.default_num_ctx(spec, None)
            lease = await engine.acquire(spec, num_ctx=num_ctx, keep_alive=None, slot=bool(prompt))
            try:
                frames = _TextFrames(f"cmpl-{random.randrange(999)}", model, include_usage)
                if not prompt:  # Ollama's load shortcut, rendered as a completion
                    engine.stats.requests_served += 1
                    if not stream:
                        return json_response(frames.whole("", "load", Metrics()))
                    resp = await start_stream(request, SSE)
                    await resp.write(_sse(frames.chunk("", "load")) + b"data: [DONE]\n\n")
                    await resp.write_eof()
                    return resp
                job = GenerationJob(
                    spec=spec,
                    key=protocol.prompt_key(spec, "generate", "", prompt, None, ""),
                    prompt_tokens=protocol.chat_prompt_tokens([{"content": prompt}]),
                    num_predict=max_tokens,
                    seed=seed,
                    started=started,
                )
                return await self._render_text(request, spec, job, lease, frames, stream=stream)
            finally:
                engine.release(lease)

        return await self._respond(run)

    async def _render_text(
        self,
        request: web.Request,
        spec: ModelSpec,
        job: GenerationJob,
        lease: Lease,
        frames: _TextFrames,
        *,
        stream: bool,
    ) -> web.StreamResponse:
        engine = self.engine
        model_stats = engine.stats.model(spec.name)
        resp: web.StreamResponse | None = None
        events = engine.generate(job, lease)
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, Tokens):
                    if stream:
                        if resp is None:
                            resp = await start_stream(request, SSE)
                        await resp.write(b"".join(_sse(frames.chunk(t, None)) for t in event.texts))
                elif isinstance(event, Done):
                    model_stats.completed += 1
                    engine.stats.requests_served += 1
                    if not stream:
                        return json_response(
                            frames.whole(event.text, event.done_reason, event.metrics)
                        )
                    if resp is None:
                        resp = await start_stream(request, SSE)
                    await resp.write(frames.ending(event))
                    await resp.write_eof()
                    return resp
                else:
                    return await fail_generation(
                        request,
                        engine,
                        model_stats,
                        resp,
                        event,
                        lambda _: _sse(frames.chunk("", None)),
                    )
        raise ApiError(500, "generation ended without a result")

    # -- embeddings -----------------------------------------------------------------

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()

        async def run() -> web.StreamResponse:
            s = "EmbedRequest"
            body = protocol.decode_body(await request.read(), s)
            model = protocol.str_field(body, s, "model")
            fmt = protocol.str_field(body, s, "encoding_format")
            dims = protocol.typed_field(body, s, "dimensions", "number", "int")
            if fmt and fmt.lower() not in ("float", "base64"):
                raise ApiError(
                    400,
                    f"Invalid value for 'encoding_format' = {fmt}. "
                    "Supported values: ['float', 'base64'].",
                )
            raw = body.get("input")
            if raw == "":
                raw = [""]
            if raw is None or (isinstance(raw, list) and not raw):
                raise ApiError(400, "invalid input")
            if isinstance(raw, str):
                inputs = [raw]
            elif isinstance(raw, list) and all(isinstance(x, str) for x in raw):
                inputs = list(raw)
            else:
                raise ApiError(400, "invalid input type")
            spec = self.native._resolve(model, empty=ApiError(404, f"model '{model}' not found"))
            self.native._fail_if_armed()
            result = await self.native.embed_core(
                spec, model, inputs, None, None, int(dims) if dims else None, started
            )
            data = []
            for i, vec in enumerate(result["embeddings"]):
                value: Any = vec
                if fmt.lower() == "base64":
                    value = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
                data.append({"object": "embedding", "embedding": value, "index": i})
            tokens = result.get("prompt_eval_count", 0)
            return json_response(
                {
                    "object": "list",
                    "data": data,
                    "model": model,
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                }
            )

        return await self._respond(run)


def _tool_calls(tool: ToolChoice | None, text: str) -> list[dict[str, Any]]:
    """The turn's tool call in OpenAI's shape (none when it answers in text)."""
    if tool is None:
        return []
    call_id = f"call_{random.randrange(16**8):08x}"
    return [openai_tool_call(tool.name, json.dumps(tool_arguments(text)), call_id)]


class _ChatFrames:
    """The bodies of one chat completion, whole or as SSE chunks (pure)."""

    def __init__(self, completion_id: str, created: int, model: str) -> None:
        self.head = {
            "id": completion_id,
            "created": created,
            "model": model,
            "system_fingerprint": _FINGERPRINT,
        }

    def chunk(self, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return {**self.head, "object": "chat.completion.chunk", "choices": [choice]}

    def text(self, text: str, *, first: bool) -> bytes:
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        return _sse(self.chunk(delta, None))

    def whole(self, done: Done, calls: list[dict[str, Any]]) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": done.text}
        if calls:
            message["tool_calls"] = calls
        choice = {"index": 0, "message": message, "finish_reason": done.done_reason or None}
        return {
            **self.head,
            "object": "chat.completion",
            "choices": [choice],
            "usage": _usage(done.metrics),
        }

    def ending(
        self, done: Done, calls: list[dict[str, Any]], first: bool, include_usage: bool
    ) -> bytes:
        """Tool calls (or the role chunk of an empty answer), finish, usage, [DONE]."""
        out = []
        if calls:
            indexed = [{"index": i, **c} for i, c in enumerate(calls)]
            opening = {"role": "assistant", "content": "", "tool_calls": indexed}
            out.append(_sse(self.chunk(opening, None)))
        elif first:  # an empty completion still opens with a role chunk
            out.append(_sse(self.chunk({"role": "assistant", "content": ""}, None)))
        finish = self.chunk({}, done.done_reason or "stop")
        out.append(_sse(finish))
        if include_usage:
            out.append(_sse({**finish, "choices": [], "usage": _usage(done.metrics)}))
        out.append(b"data: [DONE]\n\n")
        return b"".join(out)


class _TextFrames:
    """The bodies of one legacy text completion, whole or as SSE chunks (pure)."""

    def __init__(self, completion_id: str, model: str, include_usage: bool) -> None:
        self.completion_id = completion_id
        self.model = model
        self.include_usage = include_usage

    def _head(self) -> dict[str, Any]:
        return {
            "id": self.completion_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "system_fingerprint": _FINGERPRINT,
        }

    def chunk(self, text: str, finish: str | None) -> dict[str, Any]:
        out = {**self._head(), "choices": [{"text": text, "index": 0, "finish_reason": finish}]}
        if self.include_usage:
            out["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        return out

    def whole(self, text: str, finish: str, metrics: Metrics) -> dict[str, Any]:
        choice = {"text": text, "index": 0, "finish_reason": finish}
        return {**self._head(), "choices": [choice], "usage": _usage(metrics)}

    def ending(self, done: Done) -> bytes:
        last = self.chunk("", done.done_reason)
        out = [_sse(last)]
        if self.include_usage:
            out.append(_sse({**last, "choices": [], "usage": _usage(done.metrics)}))
        out.append(b"data: [DONE]\n\n")
        return b"".join(out)
