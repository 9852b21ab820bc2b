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
    keep_alive_value,
    merged,
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


class _NdjsonParser:
    """Ollama's NDJSON stream: one object per line, a final ``"done": true`` line, or a
    final ``{"error": ...}`` line after the 200 (``StreamParser``)."""

    __slots__ = (
        "_chat",
        "_parts",
        "_path",
        "_started",
        "_thinking",
        "_tool_calls",
        "_upstream",
        "chunks",
        "error",
        "finished",
    )

    def __init__(self, upstream: OllamaUpstream, path: str, started: float, *, chat: bool) -> None:
        self._upstream = upstream
        self._path = path
        self._started = started
        self._chat = chat
        self._parts: list[str] = []
        self._thinking: list[str] = []
        self._tool_calls: list[Any] = []
        self.chunks = 0
        self.finished = False
        self.error: UpstreamError | None = None

    def _invalid(self, what: str, line: bytes) -> UpstreamError:
        text = line[:200].decode("utf-8", "replace")
        return self._upstream.protocol_error(
            f"{what} NDJSON line: {text!r}", self._path, before_first_token=self.chunks == 0
        )

    def _object(self, line: bytes) -> dict[str, Any]:
        try:
            obj = parse_streamed_json(line)
        except ValueError:
            raise self._invalid("invalid", line) from None
        if not isinstance(obj, dict):
            raise self._invalid("unexpected", line)
        if "error" in obj:
            # Ollama's way to fail after it sent 200: a final {"error": ...} line.
            text = str(obj["error"])
            up = self._upstream
            raise UpstreamError(
                f"{up.kind} {up.url(self._path)}: error in stream: {text}",
                status=200,
                before_first_token=self.chunks == 0,
                # Usually the runner died: the instance's fault, not the request's.
                retryable=True,
                upstream_message=text,
            )
        return obj

    def _output(self, obj: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
        """A line's text and its other output (thinking, tool calls; None when none)."""
        if self._chat:
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
            extra = dict(message) if self._chat else {"thinking": think}
        if think:
            self._thinking.append(think)
        if isinstance(calls, list):
            self._tool_calls.extend(calls)
        return piece, extra

    def feed(self, lines: list[bytes]) -> list[Event]:
        events: list[Event] = []
        run: list[Delta] = []  # plain text deltas in a row: they go on as one
        for line in lines:
            if not line.strip():
                continue
            try:
                obj = self._object(line)
            except UpstreamError as error:
                self.error = error  # raised once the output before it went on
                break
            piece, extra = self._output(obj)
            if obj.get("done"):
                if piece:  # a non-streamed answer carries the text in the final line
                    self._parts.append(piece)
                if run:
                    events.append(merged(run))
                events.append(
                    OllamaUpstream.done_of(
                        obj,
                        "".join(self._parts),
                        self.chunks,
                        self._started,
                        self._chat,
                        self._thinking,
                        self._tool_calls,
                    )
                )
                self.finished = True
                return events
            if piece or extra:
                self._parts.append(piece)
                self.chunks += 1
                delta = Delta(text=piece, completion_tokens=self.chunks, message=extra)
                if extra is None:
                    run.append(delta)
                    continue
                if run:  # a delta with more than text goes on alone, in its place
                    events.append(merged(run))
                    run = []
                events.append(delta)
        if run:
            events.append(merged(run))
        return events

    def end(self) -> list[Event]:
        up = self._upstream
        raise UpstreamError(
            f"{up.kind} {up.url(self._path)}: stream ended without a final line",
            status=None,
            before_first_token=self.chunks == 0,
        )


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
            while True:
                try:
                    lines = await resp.read_lines()
                except TransportFailure as exc:
                    raise self.transport_error(exc, path, before_first_token=False) from exc
                if lines is None:
                    return
                for line in lines:
                    progress = self._pull_progress(line, path)
                    if progress is not None:
                        yield progress
        finally:
            await resp.aclose()

    def _pull_progress(self, raw: bytes, path: str) -> PullProgress | None:
        """One line of a pull; an ``{"error"}`` line fails it."""
        if not raw.strip():
            return None
        line = raw.decode("utf-8", "replace")
        data = self.decode_json(line, path, "pull line", before_first_token=False)
        if not isinstance(data, dict):
            return None
        if data.get("error"):
            raise UpstreamError(
                f"{self.kind} {self.url(path)}: {data['error']}",
                status=200,
                retryable=False,
                upstream_message=str(data["error"]),
            )
        return PullProgress(
            status=str(data.get("status", "")),
            digest=str(data.get("digest", "")),
            total=_count(data.get("total")),
            completed=_count(data.get("completed")),
        )

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

    def stream_parser(self, path: str, started: float) -> _NdjsonParser:
        return _NdjsonParser(self, path, started, chat=path == "/api/chat")

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

    @staticmethod
    def done_of(
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
