"""The official ``ollama`` Python client must parse every emulator response.

The sync client blocks, so it runs in a worker thread while the in-process
emulator serves from the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime

import ollama
import pytest

from usher.emulator import EmulatorServer


@pytest.fixture
async def aclient(emulator: EmulatorServer) -> AsyncIterator[ollama.AsyncClient]:
    async with ollama.AsyncClient(host=emulator.url) as client:
        yield client


async def test_async_client_chat_generate_stream_and_not(
    emulator: EmulatorServer, aclient: ollama.AsyncClient
) -> None:
    client = aclient

    chat = await client.chat(
        model="llama3.2:1b", messages=[{"role": "user", "content": "Why is the sky blue?"}]
    )
    assert chat.done is True
    assert chat.done_reason == "stop"
    assert chat.message.role == "assistant"
    assert chat.message.content
    assert chat.eval_count
    assert chat.eval_count > 0
    assert chat.prompt_eval_count
    assert chat.prompt_eval_count > 0
    assert chat.total_duration
    assert chat.load_duration
    assert chat.eval_duration

    parts = [
        part
        async for part in await client.chat(
            model="llama3.2:1b",
            messages=[{"role": "user", "content": "Why is the sky blue?"}],
            stream=True,
        )
    ]
    assert parts[-1].done is True
    assert all(not p.done for p in parts[:-1])
    # Deterministic: streaming yields exactly the non-streamed text.
    assert "".join(p.message.content or "" for p in parts) == chat.message.content
    assert parts[-1].eval_count == len(parts) - 1

    gen = await client.generate(model="qwen2.5:0.5b", prompt="hello", options={"num_predict": 3})
    assert gen.done_reason == "length"
    assert gen.eval_count == 3
    assert gen.context
    chunks = [
        c
        async for c in await client.generate(
            model="qwen2.5:0.5b", prompt="hello", stream=True, options={"num_predict": 3}
        )
    ]
    assert "".join(c.response or "" for c in chunks) == gen.response
    assert isinstance(datetime.fromisoformat(chunks[0].created_at or ""), datetime)


async def test_async_client_metadata_and_embeddings(
    emulator: EmulatorServer, aclient: ollama.AsyncClient
) -> None:
    client = aclient
    listed = await client.list()
    assert [m.model for m in listed.models] == [
        "llama3.2:1b",
        "qwen2.5:0.5b",
        "nomic-embed-text:latest",
    ]
    assert listed.models[0].size
    assert listed.models[0].details
    assert listed.models[0].details.family == "llama"

    shown = await client.show("qwen2.5:0.5b")
    assert shown.details
    assert shown.details.parameter_size == "494.03M"
    assert shown.modelinfo
    assert shown.modelinfo["qwen2.context_length"] == 32768
    assert shown.capabilities
    assert "completion" in shown.capabilities

    emb = await client.embed(model="nomic-embed-text", input=["one", "two"])
    assert len(emb.embeddings) == 2
    assert len(emb.embeddings[0]) == 768
    single = await client.embed(model="nomic-embed-text", input="one")
    assert single.embeddings[0] == emb.embeddings[0]
    legacy = await client.embeddings(model="nomic-embed-text", prompt="one")
    assert list(legacy.embedding) == pytest.approx(list(emb.embeddings[0]))

    ps = await client.ps()
    names = {m.model for m in ps.models}
    assert names == {"nomic-embed-text:latest"}
    model = ps.models[0]
    assert model.size
    assert model.size_vram
    assert model.context_length == 2048
    assert model.expires_at is not None
    assert model.digest

    with pytest.raises(ollama.ResponseError) as info:
        await client.chat(model="missing:1b", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 404
    assert info.value.error == "model 'missing:1b' not found"


async def test_async_client_load_unload_and_stream_errors(
    emulator: EmulatorServer, aclient: ollama.AsyncClient
) -> None:
    client = aclient
    loaded = await client.generate(model="llama3.2:1b", prompt="")
    assert loaded.done_reason == "load"
    unloaded = await client.chat(model="llama3.2:1b", messages=[], keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert (await client.ps()).models == []

    emulator.set_faults(error_after_tokens=2, error_times=1)
    stream = await client.generate(model="llama3.2:1b", prompt="x", stream=True)
    seen = []

    async def consume() -> None:
        async for part in stream:
            seen.append(part)

    with pytest.raises(ollama.ResponseError, match="model runner has unexpectedly stopped"):
        await consume()
    assert len(seen) == 2  # two tokens arrived before the error line
    assert (await client.generate(model="llama3.2:1b", prompt="x")).done


async def test_sync_client_in_a_thread(emulator: EmulatorServer) -> None:
    def run() -> None:
        with ollama.Client(host=emulator.url) as client:
            chat = client.chat(model="qwen2.5:0.5b", messages=[{"role": "user", "content": "hi"}])
            assert chat.message.content
            streamed = "".join(
                p.message.content or ""
                for p in client.chat(
                    model="qwen2.5:0.5b", messages=[{"role": "user", "content": "hi"}], stream=True
                )
            )
            assert streamed == chat.message.content
            gen = client.generate(model="llama3.2:1b", prompt="hi", options={"seed": 42})
            again = client.generate(model="llama3.2:1b", prompt="hi", options={"seed": 42})
            other = client.generate(model="llama3.2:1b", prompt="hi", options={"seed": 43})
            assert gen.response == again.response != other.response
            assert (
                "".join(
                    p.response or ""
                    for p in client.generate(
                        model="llama3.2:1b", prompt="hi", options={"seed": 42}, stream=True
                    )
                )
                == gen.response
            )
            assert len(client.embed(model="nomic-embed-text", input="x").embeddings) == 1
            assert len(client.list().models) == 3
            assert client.show("llama3.2:1b").details is not None
            assert {m.model for m in client.ps().models} == {
                "qwen2.5:0.5b",
                "llama3.2:1b",
                "nomic-embed-text:latest",
            }
            with pytest.raises(ollama.ResponseError) as info:
                client.generate(model="llama3.2:1b", prompt="x", keep_alive="-1")
            assert info.value.status_code == 400

    await asyncio.to_thread(run)


async def test_tools_get_a_call_then_the_tool_answer_gets_text(
    emulator: EmulatorServer, aclient: ollama.AsyncClient
) -> None:
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    asked = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = await aclient.chat(model="llama3.2:1b", messages=asked, tools=[weather])
    calls = first.message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather"]
    assert isinstance(calls[0].function.arguments["city"], str)
    assert first.message.content == "" and first.done_reason == "stop"
    streamed = [
        part
        async for part in await aclient.chat(
            model="llama3.2:1b", messages=asked, tools=[weather], stream=True
        )
    ]
    assert [p.message.tool_calls is not None for p in streamed] == [True, False]
    reply = await aclient.chat(
        model="llama3.2:1b",
        messages=[*asked, first.message, {"role": "tool", "content": "sunny"}],
        tools=[weather],
    )
    assert reply.message.content and not reply.message.tool_calls
