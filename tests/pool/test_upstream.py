"""Upstream adapters against the Ollama emulator over real HTTP, plus wire-level
checks (request bodies, headers, SSE/NDJSON parsing) against a recording HTTP server that
answers with canned bodies, chunk by chunk.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import pytest
from aiohttp import web
from google.protobuf import struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from services.pool.upstream import (
    Delta,
    Done,
    Event,
    LoadedModelInfo,
    ModelNotFound,
    Started,
    Upstream,
    UpstreamError,
    UpstreamModel,
    aclose_events,
    error_text,
    parse_timestamp,
)
from services.pool.upstream_kinds import make_upstream
from services.pool.upstream_ollama import OllamaUpstream, ollama_options
from services.pool.upstream_openai import OpenAIUpstream, SseDecoder, image_url
from usher.emulator import EmulatorConfig, EmulatorServer
from usher.testing import free_port
from usher.v1 import pool_pb2, request_pb2

KINDS = ("ollama", "openai")
CHAT_MODEL = "llama3.2:1b"
EMBED_MODEL = "nomic-embed-text"

ConfigFactory = Callable[..., EmulatorConfig]

TRACEPARENT = "00-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-bbbbbbbbbbbbbbbb-01"


# -- helpers ---------------------------------------------------------------------------------


def chat_request(
    model: str = CHAT_MODEL, text: str = "Why is the sky blue?", **options: Any
) -> pool_pb2.GenerateRequest:
    return pool_pb2.GenerateRequest(
        model=model,
        chat=request_pb2.ChatInput(messages=[request_pb2.ChatMessage(role="user", content=text)]),
        options=request_pb2.GenerationOptions(**options),
    )


def generate_request(
    model: str = CHAT_MODEL, prompt: str = "Once upon a time", **fields: Any
) -> pool_pb2.GenerateRequest:
    options = fields.pop("options", None)
    return pool_pb2.GenerateRequest(
        model=model,
        generate=request_pb2.GenerateInput(prompt=prompt, **fields),
        options=options,
    )


def embed_request(
    inputs: Sequence[str], model: str = EMBED_MODEL, dimensions: int = 0
) -> pool_pb2.GenerateRequest:
    return pool_pb2.GenerateRequest(
        model=model, embed=request_pb2.EmbedInput(input=list(inputs), dimensions=dimensions)
    )


async def collect(
    upstream: Upstream, request: pool_pb2.GenerateRequest, **kwargs: Any
) -> list[Event]:
    async with contextlib.aclosing(upstream.generate(request, **kwargs)) as events:
        return [event async for event in events]


async def collect_into(
    out: list[Event], upstream: Upstream, request: pool_pb2.GenerateRequest
) -> None:
    """Like ``collect`` but keeps what arrived before an exception."""
    async with contextlib.aclosing(upstream.generate(request)) as events:
        async for event in events:
            out.append(event)


def split(events: list[Event]) -> tuple[list[Delta], Done]:
    """Check the event grammar (Started, Delta*, Done) and return its parts."""
    assert isinstance(events[0], Started)
    assert isinstance(events[-1], Done)
    assert sum(isinstance(e, Started) for e in events) == 1
    deltas = [e for e in events[1:-1] if isinstance(e, Delta)]
    assert len(deltas) == len(events) - 2
    return deltas, events[-1]


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


@pytest.fixture
async def emulator_upstream(
    upstream_emulator: EmulatorServer, request: pytest.FixtureRequest
) -> AsyncIterator[Upstream]:
    """An adapter of the parametrized ``kind`` on the shared fast emulator."""
    upstream = make_upstream(request.param, upstream_emulator.url)
    try:
        yield upstream
    finally:
        await upstream.aclose()


both_kinds = pytest.mark.parametrize("emulator_upstream", KINDS, indirect=True)


@contextlib.asynccontextmanager
async def running(
    config: EmulatorConfig, kind: str = "ollama", **kwargs: Any
) -> AsyncIterator[tuple[EmulatorServer, Upstream]]:
    async with EmulatorServer(config) as server:
        upstream = make_upstream(kind, server.url, **kwargs)
        try:
            yield server, upstream
        finally:
            await upstream.aclose()


@contextlib.contextmanager
def unaccepting_port() -> Iterator[int]:
    """A listener whose accept backlog is full: new connects hang (connect timeout)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = int(listener.getsockname()[1])
    fillers = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(("127.0.0.1", port))
        fillers.append(c)
    try:
        yield port
    finally:
        for c in fillers:
            c.close()
        listener.close()


# -- construction -------------------------------------------------------------------------------


async def test_make_upstream_kinds() -> None:
    ollama = make_upstream("ollama", "http://127.0.0.1:11434/")
    openai = make_upstream("OpenAI", "http://127.0.0.1:8000")
    try:
        assert isinstance(ollama, OllamaUpstream) and ollama.kind == "ollama"
        assert ollama.base_url == "http://127.0.0.1:11434"
        assert isinstance(openai, OpenAIUpstream) and openai.kind == "openai"
        assert isinstance(ollama, Upstream) and isinstance(openai, Upstream)
        assert openai.url("/models") == "http://127.0.0.1:8000/v1/models"
    finally:
        await ollama.aclose()
        await openai.aclose()
    with pytest.raises(ValueError, match="unknown upstream kind"):
        make_upstream("tgi", "http://x")


@pytest.mark.parametrize(
    ("base_url", "expected"),
    [
        ("http://h:8080", "http://h:8080/v1/chat/completions"),
        ("http://h:8080/v1/", "http://h:8080/v1/chat/completions"),
        ("https://api.example.com/openai/v1", "https://api.example.com/openai/v1/chat/completions"),
    ],
)
async def test_openai_api_root(base_url: str, expected: str) -> None:
    upstream = OpenAIUpstream(base_url)
    try:
        assert upstream.url("/chat/completions") == expected
    finally:
        await upstream.aclose()


# -- metadata ----------------------------------------------------------------------------------


@both_kinds
async def test_health_and_models(emulator_upstream: Upstream) -> None:
    await emulator_upstream.health()
    models = await emulator_upstream.list_models()
    names = {m.name for m in models}
    assert {"llama3.2:1b", "qwen2.5:0.5b", "nomic-embed-text:latest"} <= names
    if emulator_upstream.kind == "ollama":
        assert all(m.size_bytes > 0 for m in models)
    else:
        assert all(m == UpstreamModel(m.name) for m in models)
    assert await emulator_upstream.loaded_models() == []


@pytest.mark.parametrize("kind", KINDS)
async def test_connection_refused_is_retryable(kind: str) -> None:
    upstream = make_upstream(kind, f"http://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(UpstreamError) as health:
            await upstream.health()
        with pytest.raises(UpstreamError) as gen:
            await collect(upstream, chat_request())
    finally:
        await upstream.aclose()
    for err in (health.value, gen.value):
        assert err.status is None
        assert err.retryable and err.before_first_token
        assert "cannot connect" in err.message


@pytest.mark.parametrize("kind", KINDS)
async def test_connect_timeout_is_retryable(kind: str) -> None:
    with unaccepting_port() as port:
        upstream = make_upstream(kind, f"http://127.0.0.1:{port}", connect_timeout=0.2)
        try:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(UpstreamError) as info:
                await collect(upstream, chat_request())
            assert loop.time() - t0 < 2.0
        finally:
            await upstream.aclose()
    assert "connect timeout" in info.value.message
    assert info.value.retryable and info.value.before_first_token


# -- Ollama: load / unload / ps ------------------------------------------------------------------


async def test_ollama_load_unload_and_ps(upstream_emulator_config: ConfigFactory) -> None:
    async with running(upstream_emulator_config(load_time=0.05)) as (server, upstream):
        seconds = await upstream.load(CHAT_MODEL, keep_alive_seconds=120, num_ctx=2048)
        assert 0.05 <= seconds < 2.0
        assert server.stats.loads == 1
        (loaded,) = await upstream.loaded_models()
        assert isinstance(loaded, LoadedModelInfo)
        assert loaded.name == CHAT_MODEL
        assert loaded.size_bytes > 0 and loaded.size_vram_bytes == loaded.size_bytes
        assert loaded.context_length == 2048
        assert loaded.expires_at is not None
        remaining = (loaded.expires_at - datetime.now(UTC)).total_seconds()
        assert 100 < remaining <= 121

        # Same num_ctx: served by the loaded runner, no reload.
        await collect(upstream, chat_request(num_ctx=2048))
        assert server.stats.loads == 1 and server.stats.reloads == 0

        await upstream.unload(CHAT_MODEL)
        assert await upstream.loaded_models() == []
        assert server.stats.unloads == 1


async def test_ollama_load_forever_and_embedding_model(
    upstream_emulator_config: ConfigFactory,
) -> None:
    async with running(upstream_emulator_config()) as (_, upstream):
        await upstream.load(CHAT_MODEL, keep_alive_seconds=float("inf"))
        # Embedding-only models refuse /api/generate; the adapter loads them via /api/embed.
        await upstream.load(EMBED_MODEL)
        loaded = {m.name: m for m in await upstream.loaded_models()}
        assert set(loaded) == {CHAT_MODEL, "nomic-embed-text:latest"}
        forever = loaded[CHAT_MODEL].expires_at
        assert forever is not None and forever.year > 2100
        await upstream.unload(EMBED_MODEL)
        assert [m.name for m in await upstream.loaded_models()] == [CHAT_MODEL]


async def test_ollama_load_unknown_model(upstream_emulator: EmulatorServer) -> None:
    async with OllamaUpstream(upstream_emulator.url) as upstream:
        with pytest.raises(ModelNotFound) as info:
            await upstream.load("nope:1b")
    assert info.value.status == 404 and not info.value.retryable
    assert "model 'nope:1b' not found" in info.value.message


async def test_openai_load_is_noop(upstream_emulator: EmulatorServer) -> None:
    async with OpenAIUpstream(upstream_emulator.url) as upstream:
        assert await upstream.load(CHAT_MODEL, keep_alive_seconds=5, num_ctx=512) == 0.0
        await upstream.unload(CHAT_MODEL)
    assert upstream_emulator.stats.loads == 0


# -- generation ----------------------------------------------------------------------------------


@both_kinds
async def test_chat_stream(emulator_upstream: Upstream) -> None:
    deltas, done = split(await collect(emulator_upstream, chat_request(seed=7)))
    assert deltas, "expected streamed tokens"
    # Tokens that arrived together come as one delta: counts rise, the last is the total.
    counts = [d.completion_tokens for d in deltas]
    assert counts == sorted(set(counts)) and counts[0] >= 1
    assert done.text == "".join(d.text for d in deltas) and done.text
    assert done.done_reason == "stop"
    assert done.completion_tokens == counts[-1]
    assert done.prompt_tokens > 0
    assert done.total_seconds > 0
    assert done.message == {"role": "assistant", "content": done.text}
    assert done.embeddings == []


@both_kinds
async def test_a_whole_answer_is_the_streamed_one_without_deltas(
    emulator_upstream: Upstream,
) -> None:
    streamed = split(await collect(emulator_upstream, chat_request(seed=5)))[1]
    for request in (chat_request(seed=5), generate_request(prompt="hello")):
        events = await collect(emulator_upstream, request, whole=True)
        deltas, done = split(events)
        # Ollama answers in one body; an OpenAI-compatible server still streams.
        assert not deltas if emulator_upstream.kind == "ollama" else deltas
        assert done.text and done.completion_tokens > 0 and done.done_reason == "stop"
    whole = split(await collect(emulator_upstream, chat_request(seed=5), whole=True))[1]
    assert (whole.text, whole.message) == (streamed.text, streamed.message)


async def test_ollama_done_durations(upstream_emulator_config: ConfigFactory) -> None:
    config = upstream_emulator_config(load_time=0.05, time_to_first_token=0.02)
    async with running(config) as (_, upstream):
        _, done = split(await collect(upstream, chat_request()))
    # Nanoseconds from the final line, converted to seconds.
    assert 0.05 <= done.load_seconds < 1.0
    assert 0.02 <= done.prompt_seconds < 1.0
    assert done.total_seconds >= done.load_seconds + done.prompt_seconds


@both_kinds
async def test_same_request_same_text(emulator_upstream: Upstream) -> None:
    # The emulator is deterministic: both adapters must reassemble identical streams.
    first = split(await collect(emulator_upstream, chat_request(seed=3)))[1]
    second = split(await collect(emulator_upstream, chat_request(seed=3)))[1]
    assert first.text == second.text


@both_kinds
async def test_num_predict_caps_output(emulator_upstream: Upstream) -> None:
    deltas, done = split(await collect(emulator_upstream, chat_request(num_predict=3)))
    assert deltas[-1].completion_tokens == 3
    assert done.completion_tokens == 3
    assert done.done_reason == "length"


@both_kinds
@pytest.mark.parametrize("raw", [False, True])
async def test_generate_stream(emulator_upstream: Upstream, raw: bool) -> None:
    request = generate_request(system="" if raw else "Be terse.", raw=raw)
    deltas, done = split(await collect(emulator_upstream, request))
    assert deltas and done.text == "".join(d.text for d in deltas)
    assert done.completion_tokens == deltas[-1].completion_tokens
    if emulator_upstream.kind == "openai" and not raw:
        # Sent as a chat (system + user): the assistant message comes back too.
        assert done.message == {"role": "assistant", "content": done.text}
    else:
        assert done.message is None


@both_kinds
async def test_embed(emulator_upstream: Upstream) -> None:
    _, done = split(await collect(emulator_upstream, embed_request(["hello", "world"])))
    assert len(done.embeddings) == 2
    assert all(len(v) == 768 for v in done.embeddings)
    assert done.embeddings[0] != done.embeddings[1]
    assert done.prompt_tokens > 0 and done.completion_tokens == 0
    _, short = split(await collect(emulator_upstream, embed_request(["hello"], dimensions=64)))
    assert len(short.embeddings[0]) == 64


async def test_ollama_keep_alive_on_generate(upstream_emulator: EmulatorServer) -> None:
    async with OllamaUpstream(upstream_emulator.url) as upstream:
        await collect(upstream, chat_request(), keep_alive_seconds=0)
        # keep_alive 0: unloaded as soon as the request finished.
        await wait_until(lambda: upstream_emulator.stats.unloads == 1)
        assert await upstream.loaded_models() == []


# -- failures ------------------------------------------------------------------------------------


@both_kinds
@pytest.mark.parametrize("build", [chat_request, generate_request])
async def test_unknown_model(
    emulator_upstream: Upstream, build: Callable[..., pool_pb2.GenerateRequest]
) -> None:
    with pytest.raises(ModelNotFound) as info:
        await collect(emulator_upstream, build(model="missing:7b"))
    err = info.value
    assert err.status == 404 and not err.retryable and err.before_first_token
    assert "missing:7b" in err.message and "not found" in err.upstream_message


@pytest.mark.parametrize("kind", KINDS)
async def test_server_busy_is_retryable(kind: str, upstream_emulator_config: ConfigFactory) -> None:
    # max_queue 0: a request that has to wait (here: for a model load) is rejected.
    async with running(upstream_emulator_config(max_queue=0), kind) as (server, upstream):
        with pytest.raises(UpstreamError) as info:
            await collect(upstream, chat_request())
    err = info.value
    assert not isinstance(err, ModelNotFound)
    assert err.status == 503 and err.retryable and err.before_first_token
    assert "server busy" in err.message
    assert server.stats.requests_rejected == 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("status", "retryable"), [(400, False), (500, True), (429, True)])
async def test_http_errors(
    kind: str, status: int, retryable: bool, upstream_emulator: EmulatorServer
) -> None:
    upstream_emulator.set_faults(fail_next=1, fail_status=status, fail_message="injected failure")
    upstream = make_upstream(kind, upstream_emulator.url)
    try:
        with pytest.raises(UpstreamError) as info:
            await collect(upstream, chat_request())
        # The fault is used up: the next call succeeds.
        split(await collect(upstream, chat_request()))
    finally:
        await upstream.aclose()
    err = info.value
    assert err.status == status and err.retryable is retryable and err.before_first_token
    assert err.upstream_message == "injected failure"
    assert f"HTTP {status}: injected failure" in err.message


@pytest.mark.parametrize("kind", KINDS)
async def test_error_mid_stream(kind: str, upstream_emulator: EmulatorServer) -> None:
    upstream_emulator.set_faults(
        error_after_tokens=2, error_times=1, error_message="runner crashed"
    )
    upstream = make_upstream(kind, upstream_emulator.url)
    seen: list[Event] = []
    try:
        with pytest.raises(UpstreamError) as info:
            await collect_into(seen, upstream, chat_request())
    finally:
        await upstream.aclose()
    assert isinstance(seen[0], Started)
    # The two tokens before the error went on (together when they arrived together).
    deltas = seen[1:]
    assert all(isinstance(e, Delta) for e in deltas)
    assert cast(Delta, deltas[-1]).completion_tokens == 2
    err = info.value
    assert not err.before_first_token and not err.retryable
    if kind == "ollama":
        # Ollama: a final {"error": ...} line on a 200 stream.
        assert err.status == 200 and err.upstream_message == "runner crashed"
    else:
        # Ollama's /v1 drops the text and ends the stream without a finish reason.
        assert "stream ended" in err.message


@pytest.mark.parametrize("kind", KINDS)
async def test_error_before_first_token(kind: str, upstream_emulator: EmulatorServer) -> None:
    # Nothing streamed yet: Ollama answers 500 instead of a 200 stream.
    upstream_emulator.set_faults(error_after_tokens=0, error_times=1, error_message="oom")
    upstream = make_upstream(kind, upstream_emulator.url)
    try:
        with pytest.raises(UpstreamError) as info:
            await collect(upstream, chat_request())
    finally:
        await upstream.aclose()
    assert info.value.status == 500
    assert info.value.retryable and info.value.before_first_token


@pytest.mark.parametrize("kind", KINDS)
async def test_connection_dropped_mid_stream(kind: str, upstream_emulator: EmulatorServer) -> None:
    upstream_emulator.set_faults(drop_after_tokens=3, drop_times=1)
    upstream = make_upstream(kind, upstream_emulator.url)
    seen: list[Event] = []
    try:
        with pytest.raises(UpstreamError) as info:
            await collect_into(seen, upstream, chat_request())
    finally:
        await upstream.aclose()
    assert [e for e in seen if isinstance(e, Delta)][-1].completion_tokens == 3
    assert info.value.status is None
    assert not info.value.before_first_token and not info.value.retryable


@pytest.mark.parametrize("kind", KINDS)
async def test_read_timeout_before_first_token(
    kind: str, upstream_emulator: EmulatorServer
) -> None:
    upstream_emulator.set_faults(hang=True)
    upstream = make_upstream(kind, upstream_emulator.url, read_timeout=0.2)
    try:
        with pytest.raises(UpstreamError) as info:
            await collect(upstream, chat_request())
    finally:
        await upstream.aclose()
        upstream_emulator.clear_faults()
    assert "read timeout" in info.value.message
    assert info.value.retryable and info.value.before_first_token


@pytest.mark.parametrize("kind", KINDS)
async def test_read_timeout_mid_stream(kind: str, upstream_emulator: EmulatorServer) -> None:
    upstream_emulator.set_faults(hang_after_tokens=2)
    upstream = make_upstream(kind, upstream_emulator.url, read_timeout=0.2)
    try:
        with pytest.raises(UpstreamError) as info:
            await collect(upstream, chat_request())
    finally:
        await upstream.aclose()
        upstream_emulator.clear_faults()
    assert "read timeout" in info.value.message
    assert not info.value.before_first_token and not info.value.retryable


@pytest.mark.parametrize("kind", KINDS)
async def test_read_timeout_counts_from_the_last_chunk_not_the_first(
    kind: str, upstream_emulator_config: ConfigFactory
) -> None:
    """An answer that never pauses for the read timeout runs as long as it takes: 12
    tokens at 20/s take 0.6 s, three times the timeout, each 50 ms after the last."""
    config = upstream_emulator_config(tokens_per_second=20, output_tokens=(12, 12))
    async with running(config, kind, read_timeout=0.2) as (_, upstream):
        deltas, done = split(await collect(upstream, chat_request()))
    assert deltas[-1].completion_tokens == 12 and done.text == "".join(d.text for d in deltas)


# -- cancellation -------------------------------------------------------------------------------


def slow_config(factory: ConfigFactory) -> EmulatorConfig:
    # 50 tokens/s and 400 tokens to go: a finished request would take 8 s.
    return factory(tokens_per_second=50, output_tokens=(400, 400))


@pytest.mark.parametrize("kind", KINDS)
async def test_aclose_stops_upstream(kind: str, upstream_emulator_config: ConfigFactory) -> None:
    async with running(slow_config(upstream_emulator_config), kind) as (server, upstream):
        events = upstream.generate(chat_request())
        deltas = 0
        async for event in events:
            if isinstance(event, Delta):
                deltas += 1
                if deltas == 2:
                    break
        assert server.stats.in_flight == 1
        await aclose_events(events)
        # The emulator sees the disconnect, cancels the handler and frees the slot.
        await wait_until(lambda: server.stats.in_flight == 0, timeout=2.0)
        model = server.stats.model(CHAT_MODEL)
        assert model.completed == 0
        assert model.tokens_generated < 50
        # The connection pool and the instance are fine afterwards.
        _, done = split(await collect(upstream, chat_request(num_predict=2)))
        assert done.completion_tokens == 2


@pytest.mark.parametrize("kind", KINDS)
async def test_break_without_aclose_stops_upstream(
    kind: str, upstream_emulator_config: ConfigFactory
) -> None:
    async with running(slow_config(upstream_emulator_config), kind) as (server, upstream):
        deltas = 0
        async for event in upstream.generate(chat_request()):
            deltas += isinstance(event, Delta)
            if deltas == 2:
                break
        # The abandoned generator is finalized (asyncio closes it) once unreferenced.
        gc.collect()
        await wait_until(lambda: server.stats.in_flight == 0, timeout=2.0)
        assert server.stats.model(CHAT_MODEL).completed == 0


async def test_task_cancel_stops_upstream(upstream_emulator_config: ConfigFactory) -> None:
    async with running(slow_config(upstream_emulator_config)) as (server, upstream):
        got_token = asyncio.Event()

        async def consume() -> None:
            async with contextlib.aclosing(upstream.generate(chat_request())) as events:
                async for event in events:
                    if isinstance(event, Delta):
                        got_token.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(got_token.wait(), 2.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: server.stats.in_flight == 0, timeout=2.0)
        assert server.stats.model(CHAT_MODEL).completed == 0


# -- wire format (a recording server) -------------------------------------------------------------


@dataclass
class Recorded:
    method: str
    path: str
    headers: CIMultiDict[str]
    content: bytes


class Recorder:
    """A model server that records requests and answers with canned bodies, writing each
    chunk on its own (serve it with ``serving``)."""

    def __init__(self, body: bytes | Sequence[bytes], content_type: str, status: int = 200):
        self.chunks = [body] if isinstance(body, bytes) else list(body)
        self.content_type = content_type
        self.status = status
        self.requests: list[Recorded] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(
            Recorded(
                request.method, request.path, CIMultiDict(request.headers), await request.read()
            )
        )
        reply = web.StreamResponse(status=self.status, headers={"Content-Type": self.content_type})
        await reply.prepare(request)
        for chunk in self.chunks:
            await reply.write(chunk)
            await asyncio.sleep(0)  # each chunk its own write
        await reply.write_eof()
        return reply

    @property
    def body(self) -> dict[str, Any]:
        data = json.loads(self.requests[-1].content)
        assert isinstance(data, dict)
        return data


@contextlib.asynccontextmanager
async def serving(recorder: Recorder) -> AsyncIterator[str]:
    """``recorder`` on a free loopback port; yields its base URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    sockets = runner.addresses
    try:
        yield f"http://127.0.0.1:{sockets[0][1]}"
    finally:
        await runner.cleanup()


def ndjson(*objs: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objs)


def sse(*objs: dict[str, Any] | str) -> bytes:
    out = b""
    for o in objs:
        out += b"data: " + (o if isinstance(o, str) else json.dumps(o)).encode() + b"\n\n"
    return out


OLLAMA_CHAT_OK = ndjson(
    {"model": "m", "message": {"role": "assistant", "content": "Hi"}, "done": False},
    {
        "model": "m",
        "message": {"role": "assistant", "content": "", "done": True},
        "done": True,
        "done_reason": "stop",
        "total_duration": 2_000_000_000,
        "load_duration": 500_000_000,
        "prompt_eval_count": 11,
        "prompt_eval_duration": 250_000_000,
        "eval_count": 1,
        "eval_duration": 1_000_000_000,
    },
)


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


async def test_ollama_request_body_and_headers() -> None:
    rec = Recorder(OLLAMA_CHAT_OK, "application/x-ndjson")
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    request = pool_pb2.GenerateRequest(
        model="m",
        chat=request_pb2.ChatInput(
            messages=[
                request_pb2.ChatMessage(role="system", content="S"),
                request_pb2.ChatMessage(role="user", content="U", images=["iVBORw0"]),
            ],
            format=json.dumps(schema),
            tools=[struct(tool)],
        ),
        options=request_pb2.GenerationOptions(
            temperature=0.0,
            seed=42,
            num_predict=64,
            num_ctx=8192,
            top_p=0.9,
            top_k=40,
            stop=["\n\n"],
            extra=struct({"num_gpu": 1, "repeat_penalty": 1.1, "think": True, "seed": 1}),
        ),
    )
    async with serving(rec) as url, OllamaUpstream(url) as up:
        _, done = split(await collect(up, request, keep_alive_seconds=300, traceparent=TRACEPARENT))
    sent = rec.requests[0]
    assert (sent.method, sent.path) == ("POST", "/api/chat")
    assert sent.headers["traceparent"] == TRACEPARENT
    assert "authorization" not in sent.headers
    assert rec.body == {
        "model": "m",
        "think": True,
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "U", "images": ["iVBORw0"]},
        ],
        "tools": [tool],
        "format": schema,
        "options": {
            "num_gpu": 1,
            "repeat_penalty": 1.1,
            "temperature": 0.0,
            "seed": 42,  # typed fields win over extra
            "num_predict": 64,
            "num_ctx": 8192,
            "top_p": 0.9,
            "top_k": 40,
            "stop": ["\n\n"],
        },
        "keep_alive": 300,
        "stream": True,
    }
    assert done == Done(
        text="Hi",
        done_reason="stop",
        prompt_tokens=11,
        completion_tokens=1,
        total_seconds=2.0,
        load_seconds=0.5,
        prompt_seconds=0.25,
        eval_seconds=1.0,
        message={"role": "assistant", "content": "Hi"},
    )


async def test_ollama_generate_and_embed_bodies() -> None:
    rec = Recorder(ndjson({"response": "", "done": True, "done_reason": "stop"}), "x")
    async with serving(rec) as url, OllamaUpstream(url) as up:
        await collect(
            up,
            generate_request(
                "m", "P", system="S", suffix="X", images=["img"], format="json", raw=True
            ),
        )
        assert rec.requests[-1].path == "/api/generate"
        assert rec.body == {
            "model": "m",
            "prompt": "P",
            "system": "S",
            "suffix": "X",
            "images": ["img"],
            "raw": True,
            "format": "json",
            "stream": True,
        }
        rec.chunks = [json.dumps({"embeddings": [[1, 2]], "prompt_eval_count": 2}).encode()]
        _, done = split(await collect(up, embed_request(["a"], "e", dimensions=2)))
        assert rec.requests[-1].path == "/api/embed"
        assert rec.body == {"model": "e", "input": ["a"], "truncate": False, "dimensions": 2}
        assert done.embeddings == [[1.0, 2.0]] and done.prompt_tokens == 2


async def test_ollama_tool_calls_and_thinking() -> None:
    call = {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    body = ndjson(
        {"message": {"role": "assistant", "content": "", "thinking": "hmm"}, "done": False},
        {"message": {"role": "assistant", "content": "", "tool_calls": [call]}, "done": False},
        {"message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop"},
    )
    rec = Recorder(body, "application/x-ndjson")
    async with serving(rec) as url, OllamaUpstream(url) as up:
        deltas, done = split(await collect(up, chat_request("m")))
    assert [d.message for d in deltas] == [
        {"role": "assistant", "content": "", "thinking": "hmm"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
    ]
    assert done.message == {
        "role": "assistant",
        "content": "",
        "thinking": "hmm",
        "tool_calls": [call],
    }
    assert done.completion_tokens == 2


@pytest.mark.parametrize(
    ("body", "match", "before"),
    [
        (b'{"response":"a","done":false}\n', "without a final line", False),
        (b"not json\n", "invalid NDJSON", True),
        (b'{"error":"boom"}\n', "boom", True),
    ],
)
async def test_ollama_broken_streams(body: bytes, match: str, before: bool) -> None:
    rec = Recorder(body, "application/x-ndjson")
    async with serving(rec) as url, OllamaUpstream(url) as up:
        with pytest.raises(UpstreamError, match=match) as info:
            await collect(up, generate_request("m"))
    assert info.value.before_first_token is before
    assert info.value.retryable is before


@pytest.mark.parametrize("kind", KINDS)
async def test_tokens_arriving_together_go_on_as_one_delta_before_a_failure(kind: str) -> None:
    """Lines read together are parsed together: their tokens make one delta (counted one
    by one), and a failure among them is raised after the output before it went on."""
    if kind == "ollama":
        body = ndjson({"response": "a", "done": False}, {"response": "b", "done": False})
        body += ndjson({"error": "boom"})
    else:
        body = sse(
            {"choices": [{"index": 0, "text": "a"}]}, {"choices": [{"index": 0, "text": "b"}]}
        )
        body += b"data: {broken\n\n"
    rec = Recorder(body, "x")  # one write: the three lines arrive together
    seen: list[Event] = []
    async with serving(rec) as url:
        up = OllamaUpstream(url) if kind == "ollama" else OpenAIUpstream(url)
        async with up:
            with pytest.raises(UpstreamError) as info:
                await collect_into(seen, up, generate_request("m", raw=True))
    assert seen[1:] == [Delta(text="ab", completion_tokens=2)]
    assert not info.value.before_first_token and not info.value.retryable


async def test_openai_request_body_and_headers() -> None:
    rec = Recorder(
        sse(
            {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
            {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 1}},
            "[DONE]",
        ),
        "text/event-stream",
    )
    options = request_pb2.GenerationOptions(
        temperature=0.5,
        seed=1,
        num_predict=5,
        num_ctx=4096,
        top_p=0.8,
        top_k=20,
        stop=["END"],
        extra=struct({"min_p": 0.05}),
    )
    request = generate_request("m", "P", system="S", images=["/9j/abc"], options=options)
    async with serving(rec) as url, OpenAIUpstream(url, api_key="sk-test") as up:
        deltas, done = split(await collect(up, request, traceparent=TRACEPARENT))
    sent = rec.requests[0]
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == "Bearer sk-test"
    assert sent.headers["traceparent"] == TRACEPARENT
    assert rec.body == {
        "min_p": 0.05,
        "max_tokens": 5,
        "temperature": 0.5,
        "top_p": 0.8,
        "seed": 1,
        "stop": ["END"],
        "top_k": 20,
        "model": "m",
        "messages": [
            {"role": "system", "content": "S"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "P"},
                    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/abc"}},
                ],
            },
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert [d.text for d in deltas] == ["Hi"]
    assert done.text == "Hi" and done.done_reason == "length"
    assert (done.prompt_tokens, done.completion_tokens) == (9, 1)
    assert done.message == {"role": "assistant", "content": "Hi"}


async def test_openai_standard_only_and_completions() -> None:
    rec = Recorder(
        sse({"choices": [{"index": 0, "text": "x", "finish_reason": "stop"}]}, "[DONE]"),
        "text/event-stream",
    )
    options = request_pb2.GenerationOptions(top_k=20, num_predict=-1, extra=struct({"min_p": 1}))
    async with serving(rec) as url, OpenAIUpstream(f"{url}/v1", standard_only=True) as up:
        _, done = split(await collect(up, generate_request("m", "P", suffix="Q", options=options)))
    assert rec.requests[0].path == "/v1/completions"
    assert rec.body == {
        "model": "m",
        "prompt": "P",
        "suffix": "Q",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    # No usage in the stream: tokens are counted from the deltas.
    assert done.text == "x" and done.completion_tokens == 1 and done.prompt_tokens == 0
    assert done.message is None


async def test_openai_tool_calls_are_assembled() -> None:
    def call(**fn: str) -> dict[str, Any]:
        return {"index": 0, "id": "call_1", "type": "function", "function": fn}

    rec = Recorder(
        sse(
            {"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]},
            {"choices": [{"index": 0, "delta": {"tool_calls": [call(name="get_weather")]}}]},
            {"choices": [{"index": 0, "delta": {"tool_calls": [call(arguments='{"city":')]}}]},
            {"choices": [{"index": 0, "delta": {"tool_calls": [call(arguments='"Paris"}')]}}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
            "[DONE]",
        ),
        "text/event-stream",
    )
    async with serving(rec) as url, OpenAIUpstream(url) as up:
        deltas, done = split(await collect(up, chat_request("m")))
    assert len(deltas) == 3 and all(d.message and "tool_calls" in d.message for d in deltas)
    assert done.done_reason == "tool_calls"
    assert done.message == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            }
        ],
    }


@pytest.mark.parametrize(
    ("body", "match", "status", "before"),
    [
        # vLLM: an error object as an SSE data event.
        (
            sse(
                {"choices": [{"index": 0, "delta": {"content": "a"}}]},
                {"error": {"message": "engine dead", "code": 500}},
            ),
            "engine dead",
            500,
            False,
        ),
        # llama.cpp: a non-standard "error:" line.
        (
            b'error: {"code":500,"message":"slot failed","type":"server_error"}\n\n',
            "slot",
            200,
            True,
        ),
        (sse({"choices": [{"index": 0, "delta": {"content": "a"}}]}), "stream ended", None, False),
        # llama-cpp-python, interrupted by another request: [DONE] but no finish_reason.
        (
            sse({"choices": [{"index": 0, "delta": {"content": "a"}}]}, "[DONE]"),
            "before a finish reason",
            None,
            False,
        ),
        (sse("[DONE]"), "after 0 chunks", None, True),
    ],
)
async def test_openai_stream_errors(
    body: bytes, match: str, status: int | None, before: bool
) -> None:
    rec = Recorder(body, "text/event-stream")
    async with serving(rec) as url, OpenAIUpstream(url) as up:
        with pytest.raises(UpstreamError, match=match) as info:
            await collect(up, chat_request("m"))
    assert info.value.status == status
    assert info.value.before_first_token is before
    assert info.value.retryable is before


async def test_openai_http_error_dialects() -> None:
    vllm_404 = {"object": "error", "message": "The model `m` does not exist.", "code": 404}
    rec = Recorder(json.dumps(vllm_404).encode(), "application/json", status=404)
    async with serving(rec) as url, OpenAIUpstream(url) as up:
        with pytest.raises(ModelNotFound, match="does not exist"):
            await collect(up, chat_request("m"))
        rec.status, rec.chunks = 401, [b'{"error":{"message":"bad key","type":"auth"}}']
        with pytest.raises(UpstreamError, match="HTTP 401: bad key") as info:
            await up.health()
        assert not info.value.retryable


# -- parsing units ------------------------------------------------------------------------------


def test_sse_decoder() -> None:
    d = SseDecoder()
    events = [
        d.feed(line)
        for line in [": keep-alive", "event: update", "data: a", "data:b", "", "", "data: [DONE]"]
    ]
    assert [e for e in events if e] == [("update", "a\nb")]
    assert d.flush() == ("message", "[DONE]")
    assert d.flush() is None


@settings(max_examples=60, deadline=None)
@given(
    pieces=st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=12),
    cuts=st.lists(st.integers(min_value=1, max_value=40), max_size=30),
    kind=st.sampled_from(KINDS),
)
def test_stream_survives_arbitrary_chunking(pieces: list[str], cuts: list[int], kind: str) -> None:
    """Token text comes back intact whatever the TCP segmentation, multi-byte
    characters and newlines inside tokens included."""
    if kind == "ollama":
        body = ndjson(
            *({"response": p, "done": False} for p in pieces),
            {"response": "", "done": True, "done_reason": "stop"},
        )
    else:
        body = sse(
            *({"choices": [{"index": 0, "text": p}]} for p in pieces),
            {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]},
            "[DONE]",
        )
    chunks, pos = [], 0
    for cut in cuts:
        if pos >= len(body):
            break
        chunks.append(body[pos : pos + cut])
        pos += cut
    chunks.append(body[pos:])

    async def run() -> list[Event]:
        async with serving(Recorder(chunks, "x")) as url:
            up: OllamaUpstream | OpenAIUpstream
            up = OllamaUpstream(url) if kind == "ollama" else OpenAIUpstream(url)
            async with up:
                return await collect(up, generate_request("m", raw=True))

    # A private loop in a worker thread: leaves pytest-asyncio's loop alone.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        deltas, done = split(pool.submit(asyncio.run, run()).result())
    assert "".join(d.text for d in deltas) == "".join(pieces)
    assert deltas[-1].completion_tokens == len(pieces)
    assert done.text == "".join(pieces)


def test_parse_timestamp() -> None:
    assert parse_timestamp("2024-06-04T14:38:31.837530123-07:00") == datetime.fromisoformat(
        "2024-06-04T14:38:31.837530-07:00"
    )
    assert parse_timestamp("2025-01-01T00:00:00Z") == datetime(2025, 1, 1, tzinfo=UTC)
    assert parse_timestamp("0001-01-01T00:00:00Z") is None
    assert parse_timestamp("") is None and parse_timestamp(None) is None
    assert parse_timestamp("garbage") is None


def test_error_text_dialects() -> None:
    assert error_text(b'{"error":"model \'x\' not found"}') == "model 'x' not found"
    assert error_text('{"error":{"message":"m","type":"t"}}') == "m"
    assert error_text('{"object":"error","message":"vllm says"}') == "vllm says"
    assert error_text('{"detail":"fastapi says"}') == "fastapi says"
    assert error_text(b"plain text\n") == "plain text"


def test_options_translation() -> None:
    options, top = ollama_options(
        request_pb2.GenerationOptions(num_ctx=512, extra=struct({"truncate": False, "x": 1.5}))
    )
    assert options == {"x": 1.5, "num_ctx": 512}
    assert top == {"truncate": False}
    assert ollama_options(request_pb2.GenerationOptions()) == ({}, {})
    assert image_url("iVBORw0KGgo") == "data:image/png;base64,iVBORw0KGgo"
    assert image_url("https://x/y.png") == "https://x/y.png"


def test_per_token_embeddings_are_pooled_into_one_vector() -> None:
    # llama-cpp-python's server answers a model without pooling with one vector per token.
    up = OpenAIUpstream("http://llama:8000")
    body = {"data": [{"embedding": [[1.0, 2.0], [3.0, 6.0]], "index": 0}], "usage": {}}
    done = up.embed_done(body, json.dumps(body).encode(), "/embeddings", time.perf_counter())
    assert [list(v) for v in done.embeddings] == [[2.0, 4.0]]
