"""The Ollama adapter: Ollama's native API (``/api/*``).

* chat -> ``POST /api/chat``, generate -> ``POST /api/generate``, embed ->
  ``POST /api/embed``; typed options and ``extra`` go into Ollama's ``options``
  (a few top-level request fields such as ``think`` are lifted out of ``extra``).
* Streams are NDJSON: one object per line, a final ``"done": true`` line with
  nanosecond durations, or a final ``{"error": ...}`` line with HTTP status 200.
* Load = empty prompt (``done_reason: "load"``); unload = empty prompt with
  ``keep_alive: 0`` (``done_reason: "unload"``). Embedding-only models refuse
  ``/api/generate``, so they are loaded with an empty ``/api/embed``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator
from typing import Any

from services.pool.upstream import (
    Delta,
    Done,
    Event,
    HttpUpstream,
    LoadedModelInfo,
    PullProgress,
    TransportFailure,
    UpstreamError,
    UpstreamModel,
    UpstreamResponse,
    keep_alive_value,
    parse_streamed_json,
    parse_timestamp,
    struct_to_dict,
)
from usher.v1 import pool_pb2, request_pb2

__all__ = ["OLLAMA_TOP_LEVEL_EXTRA", "OllamaUpstream", "ollama_options"]

#: ``extra`` keys that are request fields in Ollama's API rather than ``options``.
OLLAMA_TOP_LEVEL_EXTRA = frozenset({"think", "truncate", "shift", "logprobs", "top_logprobs"})


def ollama_options(opts: request_pb2.GenerationOptions) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``options``, top-level fields) for a request. Typed fields win over ``extra``."""
    options: dict[str, Any] = {}
    top: dict[str, Any] = {}
    if opts.HasField("extra"):
        for key, value in struct_to_dict(opts.extra).items():
            (top if key in OLLAMA_TOP_LEVEL_EXTRA else options)[key] = value
    if opts.HasField("temperature"):
        options["temperature"] = opts.temperature
    if opts.HasField("seed"):
        options["seed"] = opts.seed
    if opts.HasField("num_predict"):
        options["num_predict"] = opts.num_predict
    if opts.HasField("num_ctx"):
        options["num_ctx"] = opts.num_ctx
    if opts.HasField("top_p"):
        options["top_p"] = opts.top_p
    if opts.HasField("top_k"):
        options["top_k"] = opts.top_k
    if opts.stop:
        options["stop"] = list(opts.stop)
    return options, top


def _format(value: str) -> Any:
    """``format``: "json", a JSON schema (sent as an object), or omitted."""
    if not value or value == "json":
        return value or None
    try:
        return json.loads(value)
    except ValueError:
        return value  # Ollama answers 400 with its own message


def _chat_fields(chat: request_pb2.ChatInput) -> dict[str, Any]:
    messages = []
    for m in chat.messages:
        message: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.images:
            message["images"] = list(m.images)
        messages.append(message)
    fields: dict[str, Any] = {"messages": messages}
    if chat.tools:
        fields["tools"] = [struct_to_dict(t) for t in chat.tools]
    return fields


def _generate_fields(gen: request_pb2.GenerateInput) -> dict[str, Any]:
    fields: dict[str, Any] = {"prompt": gen.prompt}
    if gen.system:
        fields["system"] = gen.system
    if gen.suffix:
        fields["suffix"] = gen.suffix
    if gen.images:
        fields["images"] = list(gen.images)
    if gen.raw:
        fields["raw"] = True
    return fields


def _embed_fields(emb: request_pb2.EmbedInput) -> dict[str, Any]:
    # truncate is sent as given: false means "fail on over-long input" (Ollama's default
    # is true).
    fields: dict[str, Any] = {"input": list(emb.input), "truncate": emb.truncate}
    if emb.dimensions > 0:
        fields["dimensions"] = emb.dimensions
    return fields


def _seconds(ns: object) -> float:
    return ns / 1e9 if isinstance(ns, (int, float)) and not isinstance(ns, bool) else 0.0


def _count(value: object) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


class OllamaUpstream(HttpUpstream):
    """An Ollama server (or the emulator)."""

    kind = "ollama"

    # -- metadata -------------------------------------------------------------------

    async def health(self) -> None:
        await self.request_ok("/")

    async def list_models(self) -> list[UpstreamModel]:
        data = await self.request_json("GET", "/api/tags")
        return [
            UpstreamModel(
                name=str(m.get("name") or m.get("model")), size_bytes=_count(m.get("size"))
            )
            for m in (data.get("models") or [])
            if isinstance(m, dict)
        ]

    async def loaded_models(self) -> list[LoadedModelInfo]:
        data = await self.request_json("GET", "/api/ps")
        return [
            LoadedModelInfo(
                name=str(m.get("name") or m.get("model")),
                size_bytes=_count(m.get("size")),
                size_vram_bytes=_count(m.get("size_vram")),
                expires_at=parse_timestamp(m.get("expires_at")),
                context_length=_count(m.get("context_length")),
            )
            for m in (data.get("models") or [])
            if isinstance(m, dict)
        ]

    # -- load / unload --------------------------------------------------------------

    async def load(
        self, model: str, keep_alive_seconds: float | None = None, num_ctx: int | None = None
    ) -> float:
        body: dict[str, Any] = {"model": model, "stream": False}
        if keep_alive_seconds is not None:
            body["keep_alive"] = keep_alive_value(keep_alive_seconds)
        if num_ctx:
            # The runner is keyed on num_ctx: load with the one requests will send.
            body["options"] = {"num_ctx": num_ctx}
        started = time.perf_counter()
        try:
            data = await self.request_json("POST", "/api/generate", body)
        except UpstreamError as exc:
            if exc.status != 400 or "does not support generate" not in exc.upstream_message:
                raise
            # Embedding-only model: an empty /api/embed schedules (loads) it too.
            del body["stream"]
            body["input"] = []
            await self.request_json("POST", "/api/embed", body)
            return time.perf_counter() - started
        reason = data.get("done_reason") if isinstance(data, dict) else None
        if reason != "load":
            raise self.protocol_error(
                f"load of {model!r} answered done_reason {reason!r}",
                "/api/generate",
                before_first_token=True,
            )
        # Ollama's load answer carries no load_duration: wall time it is.
        return time.perf_counter() - started

    async def unload(self, model: str) -> None:
        body = {"model": model, "keep_alive": 0, "stream": False}
        data = await self.request_json("POST", "/api/generate", body)
        reason = data.get("done_reason") if isinstance(data, dict) else None
        if reason != "unload":
            raise self.protocol_error(
                f"unload of {model!r} answered done_reason {reason!r}",
                "/api/generate",
                before_first_token=True,
            )

    async def pull(self, model: str) -> AsyncGenerator[PullProgress, None]:
        """Ollama's /api/pull, one PullProgress per line; an ``{"error"}`` line fails it."""
        path = "/api/pull"
        resp = await self.open_stream(path, {"model": model, "stream": True})
        try:
            lines = resp.lines()
            while True:
                try:
                    line = await anext(lines, None)
                except TransportFailure as exc:
                    raise self.transport_error(exc, path, before_first_token=False) from exc
                if line is None:
                    return
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                except ValueError:
                    raise self.protocol_error(
                        f"invalid pull line {line[:200]!r}", path, before_first_token=False
                    ) from None
                if isinstance(data, dict) and data.get("error"):
                    raise UpstreamError(
                        f"{self.kind} {self.url(path)}: {data['error']}",
                        status=200,
                        retryable=False,
                        upstream_message=str(data["error"]),
                    )
                if isinstance(data, dict):
                    yield PullProgress(
                        status=str(data.get("status", "")),
                        digest=str(data.get("digest", "")),
                        total=_count(data.get("total")),
                        completed=_count(data.get("completed")),
                    )
        finally:
            await resp.aclose()

    # -- inference ------------------------------------------------------------------

    def build(
        self,
        request: pool_pb2.GenerateRequest,
        keep_alive_seconds: float | None = None,
        *,
        whole: bool = False,
    ) -> tuple[str, dict[str, Any]]:
        """(path, JSON body) for a request; with ``whole``, answered in one JSON object
        (read as a stream of one final line: no token is parsed on its own)."""
        options, top = ollama_options(request.options)
        body: dict[str, Any] = {"model": request.model, **top}
        which = request.WhichOneof("input")
        if which == "chat":
            path, fields, fmt = "/api/chat", _chat_fields(request.chat), request.chat.format
        elif which == "generate":
            path, fields = "/api/generate", _generate_fields(request.generate)
            fmt = request.generate.format
        elif which == "embed":
            path, fields, fmt = "/api/embed", _embed_fields(request.embed), ""
        else:
            raise UpstreamError(
                "request has no input (chat, generate or embed)", status=400, retryable=False
            )
        body.update(fields)
        formatted = _format(fmt)
        if formatted is not None:
            body["format"] = formatted
        if options:
            body["options"] = options
        if keep_alive_seconds is not None:
            body["keep_alive"] = keep_alive_value(keep_alive_seconds)
        if which != "embed":
            body["stream"] = not whole
        return path, body

    def is_embedding(self, path: str) -> bool:
        return path == "/api/embed"

    def stream_events(
        self, resp: UpstreamResponse, path: str, started: float
    ) -> AsyncGenerator[Event, None]:
        return self._ndjson(resp, path, started, chat=path == "/api/chat")

    def embed_done(self, data: Any, raw: bytes, path: str, started: float) -> Done:
        vectors = data.get("embeddings") or []
        return Done(
            text="",
            done_reason="stop",
            prompt_tokens=_count(data.get("prompt_eval_count")),
            completion_tokens=0,
            total_seconds=_seconds(data.get("total_duration")) or time.perf_counter() - started,
            load_seconds=_seconds(data.get("load_duration")),
            embeddings=[[float(x) for x in v] for v in vectors],
        )

    async def _ndjson(
        self, resp: UpstreamResponse, path: str, started: float, *, chat: bool
    ) -> AsyncGenerator[Event, None]:
        parts: list[str] = []
        thinking: list[str] = []
        tool_calls: list[Any] = []
        chunks = 0
        lines = resp.lines()
        while True:
            try:
                line = await anext(lines)
            except StopAsyncIteration:
                break
            except TransportFailure as exc:
                raise self.transport_error(exc, path, before_first_token=chunks == 0) from exc
            if not line.strip():
                continue
            try:
                obj = parse_streamed_json(line)
            except ValueError:
                raise self.protocol_error(
                    f"invalid NDJSON line: {line[:200]!r}", path, before_first_token=chunks == 0
                ) from None
            if not isinstance(obj, dict):
                raise self.protocol_error(
                    f"unexpected NDJSON line: {line[:200]!r}", path, before_first_token=chunks == 0
                )
            if "error" in obj:
                # Ollama's way to fail after it sent 200: a final {"error": ...} line.
                text = str(obj["error"])
                raise UpstreamError(
                    f"{self.kind} {self.url(path)}: error in stream: {text}",
                    status=200,
                    before_first_token=chunks == 0,
                    # Usually the runner died: the instance's fault, not the request's.
                    retryable=True,
                    upstream_message=text,
                )
            if chat:
                message = obj.get("message")
                message = message if isinstance(message, dict) else {}
                piece = str(message.get("content") or "")
                think = str(message.get("thinking") or "")
                calls = message.get("tool_calls")
            else:
                message = {}
                piece = str(obj.get("response") or "")
                think = str(obj.get("thinking") or "")
                calls = None
            extra = None
            if think or calls:
                extra = dict(message) if chat else {"thinking": think}
            if think:
                thinking.append(think)
            if isinstance(calls, list):
                tool_calls.extend(calls)
            if obj.get("done"):
                if piece:  # a non-streamed answer carries the text in the final line
                    parts.append(piece)
                done = self._done(obj, "".join(parts), chunks, started, chat, thinking, tool_calls)
                await self.finish_lines(lines)
                yield done
                return
            if piece or extra:
                parts.append(piece)
                chunks += 1
                yield Delta(text=piece, completion_tokens=chunks, message=extra)
        raise UpstreamError(
            f"{self.kind} {self.url(path)}: stream ended without a final line",
            status=None,
            before_first_token=chunks == 0,
        )

    @staticmethod
    def _done(
        obj: dict[str, Any],
        text: str,
        chunks: int,
        started: float,
        chat: bool,
        thinking: list[str],
        tool_calls: list[Any],
    ) -> Done:
        message: dict[str, Any] | None = None
        if chat:
            message = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = "".join(thinking)
            if tool_calls:
                message["tool_calls"] = tool_calls
        total = _seconds(obj.get("total_duration")) or time.perf_counter() - started
        return Done(
            text=text,
            done_reason=str(obj.get("done_reason") or "stop"),
            prompt_tokens=_count(obj.get("prompt_eval_count")),
            completion_tokens=_count(obj.get("eval_count")) or chunks,
            total_seconds=total,
            load_seconds=_seconds(obj.get("load_duration")),
            prompt_seconds=_seconds(obj.get("prompt_eval_duration")),
            eval_seconds=_seconds(obj.get("eval_duration")),
            message=message,
        )
