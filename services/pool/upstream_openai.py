"""The OpenAI-compatible adapter: vLLM, the llama.cpp server, LM Studio, Ollama's
``/v1`` and external providers.

* chat -> ``POST /v1/chat/completions`` with ``stream: true`` and
  ``stream_options.include_usage`` (usage arrives in a last chunk with no choices).
* generate -> a chat of ``[system, user]`` messages, so the server applies the
  model's chat template as Ollama's ``/api/generate`` does. ``raw`` (no template)
  or ``suffix`` (fill-in-the-middle) need the plain prompt, so those go to
  ``POST /v1/completions``, with ``system`` (if any) prefixed to the prompt.
* embed -> ``POST /v1/embeddings``.
* Streams are Server-Sent Events ending in ``data: [DONE]``. Errors may arrive as
  a ``data: {"error": ...}`` event, an ``error:`` event (llama.cpp), or, as
  Ollama's ``/v1`` does, a stream that just ends without a finish reason; all
  three raise ``UpstreamError``. A stream is complete only once a choice carried
  a ``finish_reason``: ``[DONE]`` without one (llama-cpp-python when another
  request interrupts it) is a truncated answer and raises too.
* Options: ``num_predict`` -> ``max_tokens`` (when positive), ``temperature``,
  ``top_p``, ``seed``, ``stop``; ``top_k`` and ``extra`` keys are sent as
  top-level fields (vLLM, llama.cpp and LM Studio take them) unless
  ``standard_only``. ``num_ctx`` is a server setting here and is not sent.
* No load/unload/ps in this API: ``load``/``unload`` are no-ops, and
  ``loaded_models`` is ``[]`` (unknown).

Base URL: a bare ``http://host:port`` gets ``/v1`` appended; a URL with a path
(``https://api.example.com/v1``, ``.../openai/v1``) is used as the API root.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from services.pool.upstream import (
    Delta,
    Done,
    Event,
    HttpUpstream,
    LoadedModelInfo,
    PullProgress,
    UpstreamError,
    UpstreamModel,
    error_text,
    merged,
    parse_streamed_json,
    status_is_retryable,
    struct_to_dict,
)
from usher.v1 import pool_pb2, request_pb2

__all__ = ["OpenAIUpstream", "SseDecoder", "image_url", "openai_options", "response_format"]

_IMAGE_MAGIC = (("iVBOR", "image/png"), ("/9j/", "image/jpeg"), ("R0lG", "image/gif"))


def image_url(data: str) -> str:
    """A base64 image (Ollama style) as an OpenAI ``image_url``: a data URL."""
    if data.startswith(("data:", "http://", "https://")):
        return data
    mime = next((m for prefix, m in _IMAGE_MAGIC if data.startswith(prefix)), None)
    if mime is None:
        mime = "image/webp" if data.startswith("UklG") else "image/jpeg"
    return f"data:{mime};base64,{data}"


def response_format(fmt: str) -> dict[str, Any] | None:
    """Ollama-style ``format`` ("json" or a JSON schema text) as ``response_format``."""
    if not fmt:
        return None
    if fmt == "json":
        return {"type": "json_object"}
    try:
        schema = json.loads(fmt)
    except ValueError:
        raise UpstreamError(
            f"format must be 'json' or a JSON schema, got {fmt[:80]!r}",
            status=400,
            retryable=False,
        ) from None
    return {"type": "json_schema", "json_schema": {"name": "response", "schema": schema}}


def openai_options(
    opts: request_pb2.GenerationOptions, *, standard_only: bool = False
) -> dict[str, Any]:
    """Top-level body fields for the typed options (and ``extra``)."""
    out: dict[str, Any] = {}
    if not standard_only and opts.HasField("extra"):
        out.update(struct_to_dict(opts.extra))
    if opts.HasField("num_predict") and opts.num_predict > 0:
        # Ollama's -1 (no limit) / -2 (fill context) have no OpenAI spelling: omit.
        out["max_tokens"] = opts.num_predict
    if opts.HasField("temperature"):
        out["temperature"] = opts.temperature
    if opts.HasField("top_p"):
        out["top_p"] = opts.top_p
    if opts.HasField("seed"):
        out["seed"] = opts.seed
    if opts.stop:
        out["stop"] = list(opts.stop)
    if not standard_only and opts.HasField("top_k"):
        out["top_k"] = opts.top_k
    return out


class SseDecoder:
    """Server-Sent Events, per the WHATWG rules we need: ``data:`` lines joined
    with newlines, ``event:`` names, comments (``:``) ignored, an empty line
    dispatches. ``feed`` returns ``(event, data)`` when an event is complete."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "error":
            # llama.cpp's server writes "error: {json}" lines (not standard SSE).
            self._event = "error"
            self._data.append(value)
        return None

    def flush(self) -> tuple[str, str] | None:
        if not self._data:
            self._event = ""
            return None
        out = (self._event or "message", "\n".join(self._data))
        self._event, self._data = "", []
        return out


@dataclass
class _StreamState:
    """What a chat/completion stream has produced so far."""

    chunks: int = 0
    parts: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str = ""
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    first_token_at: float = 0.0

    def add_tool_calls(self, calls: list[Any]) -> None:
        # Streamed tool calls come in pieces keyed by index: name first, then
        # the JSON arguments as string fragments.
        for call in calls:
            if not isinstance(call, dict):
                continue
            index = call.get("index", len(self.tool_calls))
            acc = self.tool_calls.setdefault(
                int(index),
                {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
            )
            if call.get("id"):
                acc["id"] = call["id"]
            if call.get("type"):
                acc["type"] = call["type"]
            fn = call.get("function")
            if isinstance(fn, dict):
                if fn.get("name"):
                    acc["function"]["name"] += fn["name"]
                args = fn.get("arguments")
                if isinstance(args, str):
                    acc["function"]["arguments"] += args
                elif args is not None:
                    acc["function"]["arguments"] += json.dumps(args)


def _int(value: object) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def _ms(value: object) -> float:
    return value / 1000 if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


class _SseParser:
    """An OpenAI-compatible server's Server-Sent Events: chunks until a finish reason, then
    ``[DONE]`` or the end of the body (``StreamParser``)."""

    __slots__ = (
        "_chat",
        "_decoder",
        "_path",
        "_started",
        "_state",
        "_upstream",
        "error",
        "finished",
    )

    def __init__(self, upstream: OpenAIUpstream, path: str, started: float, *, chat: bool) -> None:
        self._upstream = upstream
        self._path = path
        self._started = started
        self._chat = chat
        self._decoder = SseDecoder()
        self._state = _StreamState()
        self.finished = False
        self.error: UpstreamError | None = None

    @property
    def chunks(self) -> int:
        return self._state.chunks

    def feed(self, lines: list[bytes]) -> list[Event]:
        events: list[Event] = []
        run: list[Delta] = []  # plain text deltas in a row: they go on as one
        for line in lines:
            event = self._decoder.feed(line.decode("utf-8", "replace"))
            try:
                if event is not None and self._take(event, events, run):
                    return events
            except UpstreamError as error:
                self.error = error  # raised once the output before it went on
                break
        if run:
            events.append(merged(run))
        return events

    def end(self) -> list[Event]:
        events: list[Event] = []
        run: list[Delta] = []
        try:
            event = self._decoder.flush()
            if event is None or not self._take(event, events, run):
                self._finish(events, run)
        except UpstreamError as error:
            self.error = error  # raised once the output before it went on
            if run:
                events.append(merged(run))
        return events

    def _take(self, event: tuple[str, str], events: list[Event], run: list[Delta]) -> bool:
        """Fold one event in; True once the stream is finished."""
        name, data = event
        if data.strip() == "[DONE]":
            self._finish(events, run)
            return True
        delta = self._upstream.apply_event(name, data, self._path, self._state, self._chat)
        if delta is None:
            return False
        if delta.message is None:
            run.append(delta)
            return False
        if run:  # a delta with more than text goes on alone, in its place
            events.append(merged(run))
            run.clear()
        events.append(delta)
        return False

    def _finish(self, events: list[Event], run: list[Delta]) -> None:
        if run:
            events.append(merged(run))
            run.clear()
        state = self._state
        if not state.finish_reason:
            # A cut-off answer, not a complete one: Ollama's /v1 ends the stream this
            # way on a failure, llama-cpp-python sends [DONE] early when another
            # request interrupts this one.
            up = self._upstream
            raise UpstreamError(
                f"{up.kind} {up.url(self._path)}: stream ended before a finish reason "
                f"(after {state.chunks} chunks)",
                status=None,
                before_first_token=state.chunks == 0,
            )
        events.append(OpenAIUpstream.done_of(state, self._started, self._chat))
        self.finished = True


class OpenAIUpstream(HttpUpstream):
    """An OpenAI-compatible server."""

    kind = "openai"

    def __init__(self, base_url: str, *, standard_only: bool = False, **kwargs: Any) -> None:
        super().__init__(base_url, **kwargs)
        self.standard_only = standard_only
        has_path = urlsplit(self.base_url).path.strip("/") != ""
        self.api_root = self.base_url if has_path else self.base_url + "/v1"

    def url(self, path: str) -> str:
        return self.api_root + path

    # -- metadata -------------------------------------------------------------------

    async def health(self) -> None:
        await self.request_ok("/models")

    async def list_models(self) -> list[UpstreamModel]:
        data = await self.request_json("GET", "/models")
        entries = data.get("data") if isinstance(data, dict) else None
        return [
            UpstreamModel(name=str(m.get("id")), size_bytes=0)
            for m in (entries or [])
            if isinstance(m, dict) and m.get("id")
        ]

    async def loaded_models(self) -> list[LoadedModelInfo]:
        return []  # the API has no notion of it

    async def load(
        self, model: str, keep_alive_seconds: float | None = None, num_ctx: int | None = None
    ) -> float:
        return 0.0  # the server decides what is loaded

    async def unload(self, model: str) -> None:
        return None

    def pull(self, model: str) -> AsyncGenerator[PullProgress, None]:
        return _cannot_pull(f"{self.kind} {self.base_url}")

    # -- inference ------------------------------------------------------------------

    def build(
        self,
        request: pool_pb2.GenerateRequest,
        keep_alive_seconds: float | None = None,
        *,
        whole: bool = False,
    ) -> tuple[str, dict[str, Any]]:
        """(path, JSON body) for a request; always streamed (``whole`` aside: the usage
        of a whole answer comes in another shape)."""
        options = openai_options(request.options, standard_only=self.standard_only)
        stream = {"stream": True, "stream_options": {"include_usage": True}}
        which = request.WhichOneof("input")
        if which == "chat":
            chat = request.chat
            messages = [self._message(m.role, m.content, list(m.images)) for m in chat.messages]
            body: dict[str, Any] = {**options, "model": request.model, "messages": messages}
            if chat.tools:
                body["tools"] = [struct_to_dict(t) for t in chat.tools]
            rf = response_format(chat.format)
            if rf is not None:
                body["response_format"] = rf
            return "/chat/completions", {**body, **stream}
        if which == "generate":
            gen = request.generate
            rf = response_format(gen.format)
            if (gen.raw or gen.suffix) and not gen.images:
                prompt = f"{gen.system}\n\n{gen.prompt}" if gen.system else gen.prompt
                body = {**options, "model": request.model, "prompt": prompt}
                if gen.suffix:
                    body["suffix"] = gen.suffix
                if rf is not None:
                    body["response_format"] = rf
                return "/completions", {**body, **stream}
            messages = []
            if gen.system:
                messages.append({"role": "system", "content": gen.system})
            messages.append(self._message("user", gen.prompt, list(gen.images)))
            body = {**options, "model": request.model, "messages": messages}
            if rf is not None:
                body["response_format"] = rf
            return "/chat/completions", {**body, **stream}
        if which == "embed":
            emb = request.embed
            body = {"model": request.model, "input": list(emb.input), "encoding_format": "float"}
            if emb.dimensions > 0:
                body["dimensions"] = emb.dimensions
            return "/embeddings", body
        raise UpstreamError(
            "request has no input (chat, generate or embed)", status=400, retryable=False
        )

    @staticmethod
    def _message(role: str, content: str, images: list[str]) -> dict[str, Any]:
        if not images:
            return {"role": role, "content": content}
        parts: list[dict[str, Any]] = [{"type": "text", "text": content}]
        parts += [{"type": "image_url", "image_url": {"url": image_url(i)}} for i in images]
        return {"role": role, "content": parts}

    def is_embedding(self, path: str) -> bool:
        return path == "/embeddings"

    def stream_parser(self, path: str, started: float) -> _SseParser:
        return _SseParser(self, path, started, chat=path == "/chat/completions")

    def embed_done(self, data: Any, raw: bytes, path: str, started: float) -> Done:
        try:
            items = sorted(data["data"], key=lambda d: _int(d.get("index")))
            vectors = [self._vector(item["embedding"]) for item in items]
        except (KeyError, TypeError, AttributeError, struct.error):
            raise self.protocol_error(
                f"invalid embeddings body: {raw[:200]!r}", path, before_first_token=True
            ) from None
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        return Done(
            text="",
            done_reason="stop",
            prompt_tokens=_int(usage.get("prompt_tokens")),
            completion_tokens=0,
            total_seconds=time.perf_counter() - started,
            embeddings=vectors,
        )

    @staticmethod
    def _vector(value: Any) -> list[float]:
        if isinstance(value, str):  # base64 little-endian float32, if the server insists
            raw = base64.b64decode(value)
            return list(struct.unpack(f"<{len(raw) // 4}f", raw))
        if value and isinstance(value[0], list):
            # One vector per token (llama-cpp-python's server with a model that has no
            # pooling): their mean, the usual sentence embedding.
            return [sum(column) / len(value) for column in zip(*value, strict=True)]
        return [float(x) for x in value]

    def apply_event(
        self, name: str, data: str, path: str, state: _StreamState, chat: bool
    ) -> Delta | None:
        """Fold one SSE event into ``state``; the Delta to emit, if any."""
        before = state.chunks == 0
        try:
            obj = parse_streamed_json(data)
        except ValueError:
            if name == "error":
                obj = {"error": data}
            else:
                raise self.protocol_error(
                    f"invalid SSE data: {data[:200]!r}", path, before_first_token=before
                ) from None
        if not isinstance(obj, dict):
            raise self.protocol_error(
                f"unexpected SSE data: {data[:200]!r}", path, before_first_token=before
            )
        if name == "error" or obj.get("error") is not None:
            text = error_text(data)
            code = obj.get("error", {}).get("code") if isinstance(obj.get("error"), dict) else None
            status = code if isinstance(code, int) and 400 <= code < 600 else 200
            raise UpstreamError(
                f"{self.kind} {self.url(path)}: error in stream: {text}",
                status=status,
                before_first_token=before,
                retryable=status == 200 or status_is_retryable(status),
                upstream_message=text,
            )
        if isinstance(obj.get("usage"), dict):
            state.usage = obj["usage"]
        if isinstance(obj.get("timings"), dict):  # llama.cpp's own timing report
            state.timings = obj["timings"]
        choices = obj.get("choices") or []
        choice = next((c for c in choices if isinstance(c, dict) and c.get("index", 0) == 0), None)
        if choice is None:
            return None
        if choice.get("finish_reason"):
            state.finish_reason = str(choice["finish_reason"])
        extra: dict[str, Any] | None = None
        if chat:
            delta = choice.get("delta")
            delta = delta if isinstance(delta, dict) else {}
            piece = delta.get("content") or ""
            reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
            calls = delta.get("tool_calls")
            if isinstance(calls, list) and calls:
                state.add_tool_calls(calls)
            if isinstance(reasoning, str) and reasoning:
                state.reasoning.append(reasoning)
            if any(
                v not in (None, "", []) for k, v in delta.items() if k not in ("role", "content")
            ):
                extra = delta
        else:
            piece = choice.get("text") or ""
        piece = piece if isinstance(piece, str) else str(piece)
        if not piece and extra is None:
            return None
        if state.chunks == 0:
            state.first_token_at = time.perf_counter()
        state.chunks += 1
        state.parts.append(piece)
        return Delta(text=piece, completion_tokens=state.chunks, message=extra)

    @staticmethod
    def done_of(state: _StreamState, started: float, chat: bool) -> Done:
        end = time.perf_counter()
        text = "".join(state.parts)
        message: dict[str, Any] | None = None
        if chat:
            message = {"role": "assistant", "content": text}
            if state.reasoning:
                message["reasoning_content"] = "".join(state.reasoning)
            if state.tool_calls:
                message["tool_calls"] = [state.tool_calls[i] for i in sorted(state.tool_calls)]
        usage = state.usage or {}
        timings = state.timings or {}
        first = state.first_token_at
        prompt_seconds = _ms(timings.get("prompt_ms")) or (first - started if first else 0.0)
        eval_seconds = _ms(timings.get("predicted_ms")) or (end - first if first else 0.0)
        return Done(
            text=text,
            done_reason=state.finish_reason,
            prompt_tokens=_int(usage.get("prompt_tokens")) or _int(timings.get("prompt_n")),
            completion_tokens=(
                _int(usage.get("completion_tokens"))
                or _int(timings.get("predicted_n"))
                or state.chunks
            ),
            total_seconds=end - started,
            prompt_seconds=prompt_seconds,
            eval_seconds=eval_seconds,
            message=message,
        )


async def _cannot_pull(server: str) -> AsyncGenerator[PullProgress, None]:
    """An OpenAI-compatible server has no pull: the first step fails."""
    if server:
        raise UpstreamError(
            f"{server}: an OpenAI-compatible server cannot pull models", status=501, retryable=False
        )
    yield PullProgress("")
