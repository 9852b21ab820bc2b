"""Upstream adapters: the thin HTTP layer between the Pool and one model server.

An ``Upstream`` talks to exactly one server, either Ollama's native API
(``upstream_ollama.OllamaUpstream``) or an OpenAI-compatible one such as vLLM, the
llama.cpp server, LM Studio or an external provider (``upstream_openai.OpenAIUpstream``).
Build one with ``upstream_kinds.make_upstream(kind, base_url)``.

``generate()`` turns a ``pool_pb2.GenerateRequest`` into a stream of events::

    Started(loaded_model)                       # the server answered (headers)
    Delta(text, completion_tokens, message)     # zero or more
    Done(text, done_reason, usage, timings...)  # exactly one, last

Failures raise ``UpstreamError``. Two flags tell the Pool what it may do next:

* ``before_first_token``: no ``Delta`` was yielded yet, so nothing reached the caller.
* ``retryable``: trying another instance now may succeed. It is only ever true
  before the first token (a retry after output would duplicate it), and false for
  the request's own faults (400, 404, 422...).

The upstream always streams (``stream: true``) whatever ``GenerateRequest.stream``
says: streaming gives the first-byte signal, bounded memory, and lets a cancelled
caller stop the server's work. The Pool decides which deltas to forward.

Stopping early: the stream is an async generator that holds the HTTP response
open; ``aclose()`` it (``contextlib.aclosing`` or ``aclose_events``) and the
connection is closed, which makes Ollama / vLLM / llama.cpp abandon the request.
Breaking out of ``async for`` also closes it once the generator is garbage
collected, but only ``aclose()`` is immediate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
import urllib.request
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from http import HTTPStatus
from typing import Any, Protocol, Self, runtime_checkable
from urllib.parse import urlsplit

import aiohttp
import orjson

from usher import tracing
from usher.structs import plain_json, struct_to_dict
from usher.v1 import pool_pb2

__all__ = [
    "Delta",
    "Done",
    "Event",
    "HttpUpstream",
    "LoadedModelInfo",
    "ModelNotFound",
    "PullProgress",
    "Started",
    "TransportFailure",
    "Upstream",
    "UpstreamError",
    "UpstreamModel",
    "UpstreamResponse",
    "aclose_events",
    "describe_transport_error",
    "error_text",
    "keep_alive_value",
    "parse_streamed_json",
    "parse_timestamp",
    "plain_json",
    "status_is_retryable",
    "struct_to_dict",
]

# -- events and model info --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UpstreamModel:
    """A model the server can serve (``/api/tags`` or ``/v1/models``)."""

    name: str
    size_bytes: int = 0


@dataclass(frozen=True, slots=True)
class LoadedModelInfo:
    """A model resident in the server's memory (``/api/ps``)."""

    name: str
    size_bytes: int
    size_vram_bytes: int
    #: When its keep-alive runs out; None when unknown. Far future = "forever".
    expires_at: datetime | None
    context_length: int = 0


@dataclass(frozen=True, slots=True)
class PullProgress:
    """One progress line of a model pull (Ollama's /api/pull)."""

    status: str
    digest: str = ""
    total: int = 0
    completed: int = 0


@dataclass(frozen=True, slots=True)
class Started:
    """The server accepted the request and began answering (2xx headers).

    ``loaded_model`` is True only when the adapter knows a model load happened
    before the answer. Neither Ollama nor OpenAI-compatible servers say so at the
    first byte, so both adapters report False; Ollama's load time arrives later in
    ``Done.load_seconds``, and the Pool, which tracks what is loaded where, knows
    better anyway.
    """

    loaded_model: bool


@dataclass(frozen=True, slots=True)
class Delta:
    """New output: the text of the chunks read together (servers send about one token
    per chunk; a delta with a ``message`` is one chunk alone). ``completion_tokens``
    counts output chunks so far. ``message`` holds the non-text parts of a chat delta
    (tool calls, thinking) in the server's JSON shape, else None."""

    text: str
    completion_tokens: int
    message: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Done:
    """The final event. ``text`` is the whole output; ``message`` the assembled
    assistant message of a chat (with tool calls) or None; ``embeddings`` the
    vectors of an embed request. Durations are seconds."""

    text: str
    done_reason: str
    prompt_tokens: int
    completion_tokens: int
    total_seconds: float
    load_seconds: float = 0.0
    prompt_seconds: float = 0.0
    eval_seconds: float = 0.0
    message: dict[str, Any] | None = None
    embeddings: list[list[float]] = field(default_factory=list)


Event = Started | Delta | Done


# -- errors -------------------------------------------------------------------------


def status_is_retryable(status: int | None) -> bool:
    """Could another instance succeed where this status failed?

    ``None`` is a transport failure (refused, reset, timeout). 408/425/429 and 5xx
    (including Ollama's 503 "server busy") are the server's state, not the
    request's; other 4xx would fail anywhere.
    """
    return status is None or status in (408, 425, 429) or status >= 500


class UpstreamError(Exception):
    """A call to a model server failed.

    ``status``: the HTTP status, or None for transport failures (and for errors
    reported inside a 200 stream, where it is 200). ``upstream_message``: the
    server's own error text (Ollama's ``"error"``, OpenAI's ``error.message``).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        before_first_token: bool = True,
        retryable: bool | None = None,
        upstream_message: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.before_first_token = before_first_token
        if retryable is None:
            retryable = status_is_retryable(status)
        # A retry after output reached the caller would duplicate it.
        self.retryable = retryable and before_first_token
        self.upstream_message = upstream_message

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, status={self.status}, "
            f"before_first_token={self.before_first_token}, retryable={self.retryable})"
        )


class ModelNotFound(UpstreamError):
    """The server does not have the model (HTTP 404). Not retryable here; the
    Pool may still route the model to an instance that lists it."""

    def __init__(self, message: str, *, upstream_message: str = "") -> None:
        super().__init__(
            message,
            status=404,
            before_first_token=True,
            retryable=False,
            upstream_message=upstream_message,
        )


def parse_streamed_json(text: str | bytes) -> Any:
    """One streamed JSON value (an NDJSON line, an SSE event's data), as ``json.loads``
    reads it: orjson first (a streamed answer parses one per token), the stdlib for what
    orjson refuses (NaN, Infinity, bytes that are not UTF-8: replaced), which raises
    ValueError when it is not JSON at all."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return json.loads(text)


def error_text(body: bytes | str, limit: int = 500) -> str:
    """The human message in an error body, whatever the server's dialect:
    Ollama ``{"error": "..."}``, OpenAI ``{"error": {"message": ...}}``, vLLM
    ``{"object": "error", "message": ...}``, FastAPI ``{"detail": ...}``, or text."""
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:limit]
    if isinstance(data, Mapping):
        err = data.get("error")
        if isinstance(err, str):
            return err[:limit]
        if isinstance(err, Mapping):
            msg = err.get("message")
            return (msg if isinstance(msg, str) else json.dumps(err))[:limit]
        for key in ("message", "detail"):
            value = data.get(key)
            if isinstance(value, str):
                return value[:limit]
            if value is not None:
                return json.dumps(value)[:limit]
    return text.strip()[:limit]


# -- small helpers shared by the adapters ------------------------------------------------


def parse_timestamp(value: object) -> datetime | None:
    """RFC 3339 from a Go server (nanoseconds, ``Z``); None for empty / zero time."""
    if not isinstance(value, str) or not value:
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    # Go prints up to 9 fractional digits; datetime keeps microseconds (6).
    head, dot, rest = text.partition(".")
    if dot:
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{head}.{rest[: min(digits, 6)]}{rest[digits:]}"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return None if parsed.year <= 1 else parsed


async def aclose_events(events: AsyncIterator[Event]) -> None:
    """Stop a ``generate()`` stream now (closes its HTTP response)."""
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()


def keep_alive_value(seconds: float) -> int | float:
    """Seconds as Ollama's ``keep_alive`` number; negative means forever."""
    if math.isinf(seconds) or seconds < 0:
        return -1
    return int(seconds) if float(seconds).is_integer() else seconds


# -- the interface ----------------------------------------------------------------------


@runtime_checkable
class Upstream(Protocol):
    """One model server. Every method raises ``UpstreamError`` on failure."""

    kind: str
    base_url: str

    async def health(self) -> None:
        """Cheap liveness probe (Ollama ``GET /``, OpenAI ``GET /v1/models``)."""
        ...

    async def list_models(self) -> list[UpstreamModel]: ...

    async def loaded_models(self) -> list[LoadedModelInfo]:
        """What is resident now; ``[]`` when the server cannot say."""
        ...

    async def load(
        self, model: str, keep_alive_seconds: float | None = None, num_ctx: int | None = None
    ) -> float:
        """Load ``model`` (no-op where unsupported); returns the seconds it took."""
        ...

    async def unload(self, model: str) -> None: ...

    def pull(self, model: str) -> AsyncGenerator[PullProgress, None]:
        """Download ``model`` onto the server, reporting progress (Ollama only)."""
        ...

    def generate(
        self,
        request: pool_pb2.GenerateRequest,
        *,
        keep_alive_seconds: float | None = None,
        traceparent: str = "",
        whole: bool = False,
    ) -> AsyncGenerator[Event, None]:
        """Run one request; see the module docstring for the event order. ``whole``: the
        caller wants only the result, so a server that can answer in one body is asked
        to (no deltas then).

        An async generator, so ``contextlib.aclosing`` / ``aclose()`` stop it."""
        ...

    async def aclose(self) -> None: ...


# -- the shared HTTP plumbing --------------------------------------------------------------


#: What a failed exchange with a model server raises in aiohttp (refused, timed out, dropped
#: mid-answer); timeouts are TimeoutError.
TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError)


class TransportFailure(Exception):
    """The connection to a model server failed while an answer was being read."""


def describe_transport_error(exc: BaseException) -> str:
    if isinstance(exc, TransportFailure):
        return str(exc)
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "connect timeout"
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return "read timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect ({exc.os_error or 'refused'})"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return f"connection dropped ({exc or 'peer closed the connection'})"
    if isinstance(exc, TimeoutError):
        return "read timeout"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _env_proxy(base_url: str) -> str | None:
    """The proxy the environment (HTTP(S)_PROXY, NO_PROXY) names for ``base_url``, read
    once: aiohttp's own trust_env reads the environment again on every request."""
    parts = urlsplit(base_url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxy


class StallWatch:
    """The read timeout of a streamed body, kept by one timer per timeout period instead
    of one per chunk: each chunk notes the time (``heard``); the timer, when it fires,
    fails the body if nothing came for the timeout, else waits for the rest of it. aiohttp
    keeps the timeout until the headers (a model loading before its first byte)."""

    __slots__ = ("_content", "_heard", "_loop", "_timeout", "_timer")

    def __init__(self, content: aiohttp.StreamReader, timeout: float) -> None:
        self._content = content
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._heard = self._loop.time()
        self._timer: asyncio.TimerHandle | None = self._loop.call_at(
            self._heard + timeout, self._check
        )

    @classmethod
    def start(cls, resp: aiohttp.ClientResponse) -> StallWatch | None:
        """Take the read timeout of ``resp``'s connection over (None: it has none)."""
        connection = resp.connection
        protocol = connection.protocol if connection is not None else None
        timeout = protocol.read_timeout if protocol is not None else None
        if protocol is None or not timeout:
            return None
        # Its timer armed last is cancelled by the next chunk (or fires first: silence).
        protocol.read_timeout = None
        return cls(resp.content, timeout)

    def heard(self) -> None:
        self._heard = self._loop.time()

    def _check(self) -> None:
        silent_until = self._heard + self._timeout
        if self._loop.time() < silent_until:
            self._timer = self._loop.call_at(silent_until, self._check)
            return
        self._timer = None
        self._content.set_exception(
            aiohttp.SocketTimeoutError("Timeout on reading data from socket")
        )

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _NoWatch:
    """A body read with no read timeout: nothing to note."""

    __slots__ = ()

    def heard(self) -> None:
        return None

    def stop(self) -> None:
        return None


_NO_WATCH = _NoWatch()


class UpstreamResponse:
    """A model server's answer whose headers arrived: its body as lines in batches, all
    those that arrived together (``read_lines``), or whole (``read``). ``aclose()`` it: a
    body read to its end hands the connection back for the next request; one left
    part-read drops it, which is how the server learns its caller went away."""

    __slots__ = ("_pending", "_resp", "_watch")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self._pending = b""
        self._watch: StallWatch | _NoWatch | None = None

    async def read_lines(self) -> list[bytes] | None:
        """The complete lines (``\n`` or ``\r\n`` ended, the ending removed) of all that
        arrived since the last call, at least one, whatever the TCP segmentation; None at
        the end of the body. One call per read of the connection, not per line: a
        streamed answer has a line per token, and tokens that arrived together are
        handled together. ``TransportFailure`` when the connection fails, or stays silent
        for the session's read timeout (``StallWatch``: aiohttp would re-arm a timer for
        every chunk, a token each)."""
        content = self._resp.content
        if self._watch is None:
            self._watch = StallWatch.start(self._resp) or _NO_WATCH
        while True:
            try:
                chunk = await content.readany()
            except TRANSPORT_ERRORS as exc:
                raise TransportFailure(describe_transport_error(exc)) from exc
            if not chunk:
                self._watch.stop()
                if not self._pending:
                    return None
                tail, self._pending = self._pending, b""
                return [tail.removesuffix(b"\r")]
            self._watch.heard()
            if b"\n" not in chunk:
                self._pending += chunk
                continue
            *complete, self._pending = (self._pending + chunk).split(b"\n")
            if b"\r" in chunk:
                return [line.removesuffix(b"\r") for line in complete]
            return complete

    async def finish(self, limit: int = 64) -> None:
        """Read what follows the final event (usually nothing but the end of the chunked
        body), so the connection goes back to the pool for the next request instead of
        being closed half-read: a new TCP connection per request otherwise. A server that
        keeps talking past ``limit`` reads just loses its connection."""
        with contextlib.suppress(TransportFailure):
            for _ in range(limit):
                if await self.read_lines() is None:
                    return

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except TRANSPORT_ERRORS as exc:
            raise TransportFailure(describe_transport_error(exc)) from exc

    async def aclose(self) -> None:
        if self._watch is not None:
            self._watch.stop()
        if self._resp.content.at_eof():
            self._resp.release()
        else:
            self._resp.close()


class StreamParser(Protocol):
    """How one kind of server's streamed answer reads: lines in, events out, in order.
    ``chunks`` counts the output chunks seen (none yet: a failure can be retried
    elsewhere); ``finished`` is set once the final event was returned; ``error`` is the
    failure a line announced, raised once the events of the lines before it went on."""

    @property
    def chunks(self) -> int: ...

    @property
    def finished(self) -> bool: ...

    @property
    def error(self) -> UpstreamError | None: ...

    def feed(self, lines: list[bytes]) -> list[Event]:
        """The events of lines that arrived together: text deltas that follow one another
        merged into one (several tokens in one Delta), the final event last."""
        ...

    def end(self) -> list[Event]:
        """The body ended: the last events, or the error of an answer cut short."""
        ...


def merged(deltas: list[Delta]) -> Delta:
    """Plain text deltas that arrived together, as one."""
    if len(deltas) == 1:
        return deltas[0]
    return Delta(
        text="".join(d.text for d in deltas), completion_tokens=deltas[-1].completion_tokens
    )


_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


class HttpUpstream:
    """What both adapters share: one pooled aiohttp session per server (the lightest
    client measured: about a third of httpx's CPU per call), the timeouts, and the mapping
    of HTTP failures to ``UpstreamError``."""

    kind: str = ""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        connect_timeout: float = 2.0,
        read_timeout: float = 300.0,
        max_connections: int = 256,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"User-Agent": "usher-pool"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            # Getting a connection: a free one from the pool (a full pool means we are over
            # capacity: fail fast, retry elsewhere) or a new one.
            connect=connect_timeout,
            sock_connect=connect_timeout,
            # Between bytes: covers a model load before the first byte.
            sock_read=read_timeout,
        )
        self._max_connections = max_connections
        self._proxy = _env_proxy(self.base_url)
        #: Made on first use, inside the running event loop (aiohttp binds it there).
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r})"

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0),
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- requests ---------------------------------------------------------------------

    def url(self, path: str) -> str:
        return self.base_url + path

    def headers(self, traceparent: str = "") -> dict[str, str]:
        # Only a well-formed W3C traceparent is passed on: the field comes from callers, and
        # anything else (non-ASCII, line breaks) is no header an HTTP client can send.
        return {"traceparent": traceparent} if _TRACEPARENT.fullmatch(traceparent) else {}

    def transport_error(
        self, exc: BaseException, path: str, *, before_first_token: bool
    ) -> UpstreamError:
        return UpstreamError(
            f"{self.kind} {self.url(path)}: {describe_transport_error(exc)}",
            status=None,
            before_first_token=before_first_token,
        )

    def status_error(self, status: int, body: bytes, path: str) -> UpstreamError:
        text = error_text(body) or _reason_phrase(status)
        message = f"{self.kind} {self.url(path)}: HTTP {status}: {text}"
        if status == 404:
            return ModelNotFound(message, upstream_message=text)
        return UpstreamError(message, status=status, upstream_message=text)

    def decode_json(
        self, raw: bytes | str, path: str, what: str, *, before_first_token: bool
    ) -> Any:
        """A whole JSON value from the server (a body, a line of a pull); garbage is a
        protocol error naming ``what`` it was."""
        try:
            return json.loads(raw)
        except ValueError:
            text = raw[:200] if isinstance(raw, str) else raw[:200].decode("utf-8", "replace")
            raise self.protocol_error(
                f"invalid {what}: {text!r}", path, before_first_token=before_first_token
            ) from None

    def protocol_error(self, what: str, path: str, *, before_first_token: bool) -> UpstreamError:
        # Garbage from the server is its fault: retryable (if nothing was streamed yet).
        return UpstreamError(
            f"{self.kind} {self.url(path)}: {what}",
            status=None,
            before_first_token=before_first_token,
            retryable=True,
        )

    async def _call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        traceparent: str = "",
    ) -> aiohttp.ClientResponse:
        """Send a request; the response once its headers arrived (any status)."""
        url = self.url(path)
        headers = self.headers(traceparent)
        data = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        try:
            with tracing.http_client_span(method, url, headers):
                return await self._client().request(
                    method,
                    url,
                    data=data,
                    headers=headers,
                    proxy=self._proxy,
                    allow_redirects=False,
                )
        except TRANSPORT_ERRORS as exc:
            raise self.transport_error(exc, path, before_first_token=True) from exc

    async def _whole(
        self, method: str, path: str, body: Mapping[str, Any] | None = None, traceparent: str = ""
    ) -> tuple[int, bytes]:
        resp = await self._call(method, path, body, traceparent)
        try:
            return resp.status, await resp.read()
        except TRANSPORT_ERRORS as exc:
            raise self.transport_error(exc, path, before_first_token=True) from exc
        finally:
            resp.release()

    async def request_json(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        traceparent: str = "",
    ) -> Any:
        """One non-streaming call; returns the decoded JSON body."""
        status, content = await self._whole(method, path, body, traceparent)
        if not 200 <= status < 300:
            raise self.status_error(status, content, path)
        return self.decode_json(content, path, "JSON body", before_first_token=True)

    async def request_ok(self, path: str) -> None:
        """GET that only has to succeed (health probes)."""
        status, content = await self._whole("GET", path)
        if not 200 <= status < 300:
            raise self.status_error(status, content, path)

    # What each kind of server defines: how a request becomes a call, how its answer reads.

    def build(
        self,
        request: pool_pb2.GenerateRequest,
        keep_alive_seconds: float | None = None,
        *,
        whole: bool = False,
    ) -> tuple[str, dict[str, Any]]:
        raise NotImplementedError

    def is_embedding(self, path: str) -> bool:
        raise NotImplementedError

    def stream_parser(self, path: str, started: float) -> StreamParser:
        raise NotImplementedError

    def embed_done(self, data: Any, raw: bytes, path: str, started: float) -> Done:
        raise NotImplementedError

    async def generate(
        self,
        request: pool_pb2.GenerateRequest,
        *,
        keep_alive_seconds: float | None = None,
        traceparent: str = "",
        whole: bool = False,
    ) -> AsyncGenerator[Event, None]:
        path, body = self.build(request, keep_alive_seconds, whole=whole)
        started = time.perf_counter()
        resp = await self.open_stream(path, body, traceparent=traceparent)
        try:
            yield Started(loaded_model=False)
            if self.is_embedding(path):
                raw = await self.read_body(resp, path)
                data = self.decode_json(raw, path, "JSON body", before_first_token=True)
                yield self.embed_done(data, raw, path, started)
                return
            # One pass per read of the connection, not per line: the lines that arrived
            # together are parsed together, and their tokens go on as one delta.
            parser = self.stream_parser(path, started)
            while True:
                try:
                    lines = await resp.read_lines()
                except TransportFailure as exc:
                    raise self.transport_error(
                        exc, path, before_first_token=parser.chunks == 0
                    ) from exc
                for event in parser.feed(lines) if lines is not None else parser.end():
                    yield event
                if parser.error is not None:
                    raise parser.error
                if parser.finished:
                    await resp.finish()
                    return
                if lines is None:
                    raise UpstreamError(
                        f"{self.kind} {self.url(path)}: stream ended without a final event",
                        status=None,
                        before_first_token=parser.chunks == 0,
                    )
        finally:
            # An early exit closes the connection, and the server stops generating.
            await resp.aclose()

    async def read_body(self, resp: UpstreamResponse, path: str) -> bytes:
        try:
            return await resp.read()
        except TransportFailure as exc:
            raise self.transport_error(exc, path, before_first_token=True) from exc

    async def open_stream(
        self, path: str, body: Mapping[str, Any], *, traceparent: str = ""
    ) -> UpstreamResponse:
        """POST and return the response once its headers arrived with a 2xx status.
        The caller must ``aclose()`` it; closing early drops the connection, which
        is how the server learns the caller went away."""
        resp = await self._call("POST", path, body, traceparent)
        if 200 <= resp.status < 300:
            return UpstreamResponse(resp)
        try:
            content = await resp.read()
        except TRANSPORT_ERRORS:
            content = b""
        finally:
            resp.release()
        raise self.status_error(resp.status, content, path)


def _reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""
