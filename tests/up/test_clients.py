"""What ``make up`` serves, driven by the official ``ollama`` and ``openai`` clients and by
LangChain with placeholder keys (local open mode), as a user coming from Ollama would."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any, cast

import httpx
import ollama
import openai
import pytest

from tests.up.conftest import REPO, RunningUp

pytestmark = pytest.mark.slow
MODEL = "llama3.2:1b"
EMBED = "nomic-embed-text"
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "the city"}},
            "required": ["city"],
        },
    },
}
ADD: Any = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two numbers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}


def ollama_client(up: RunningUp) -> ollama.Client:
    return ollama.Client(host=up.gateway.removeprefix("http://"))


def openai_client(up: RunningUp, key: str = "x") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{up.gateway}/v1", api_key=key, max_retries=0)


def test_the_try_it_block_names_every_way_in(up: RunningUp) -> None:
    host = up.gateway.removeprefix("http://")
    out = up.output
    assert f"OLLAMA_HOST={host} ollama run {MODEL}" in out
    assert f"curl {up.gateway}/api/chat" in out
    assert f'OpenAI(base_url="{up.gateway}/v1"' in out
    assert f"usher chat {MODEL}" in out and "usher top" in out
    assert "Press Ctrl-C" in out


def test_ollama_client_chat_generate_embed_and_the_catalogue(up: RunningUp) -> None:
    client = ollama_client(up)
    answer = client.chat(MODEL, messages=[{"role": "user", "content": "hi"}])
    assert answer.message.content and answer.done and answer.eval_count
    parts = list(client.chat(MODEL, messages=[{"role": "user", "content": "hi"}], stream=True))
    assert parts[-1].done and "".join(p.message.content or "" for p in parts[:-1])
    generated = client.generate(
        MODEL,
        "Why is the sky blue?",
        options={"temperature": 0, "seed": 7, "num_predict": 8, "stop": ["zzz"]},
        keep_alive="10m",
    )
    assert generated.response and (generated.eval_count or 0) <= 8
    streamed = list(client.generate(MODEL, "hello", stream=True))
    assert streamed[-1].done
    as_json = client.chat(MODEL, messages=[{"role": "user", "content": "a json"}], format="json")
    assert isinstance(json.loads(as_json.message.content or ""), dict)
    vectors = client.embed(EMBED, input=["one", "two"])
    assert len(vectors.embeddings) == 2 and len(vectors.embeddings[0]) > 10
    names = {m.model for m in client.list().models}
    assert MODEL in names
    assert isinstance(client.ps().models, list)
    assert client.show(MODEL).details is not None


def test_ollama_client_unknown_model_is_a_404(up: RunningUp) -> None:
    with pytest.raises(ollama.ResponseError) as raised:
        ollama_client(up).chat("no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.status_code == 404


def test_openai_client_with_a_placeholder_key(up: RunningUp) -> None:
    client = openai_client(up)
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        seed=3,
        stop=["zzz"],
    )
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens <= 6
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    legacy = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5)
    assert legacy.choices[0].text and legacy.object == "text_completion"
    pieces = list(client.completions.create(model=MODEL, prompt="Once", stream=True))
    assert "".join(p.choices[0].text for p in pieces if p.choices)
    assert pieces[-1].choices[0].finish_reason in ("stop", "length")
    embedded = client.embeddings.create(model=EMBED, input="hello")
    assert len(embedded.data[0].embedding) > 10
    assert MODEL in {m.id for m in client.models.list()}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_ollama_tool_calls_travel_the_queue_and_the_follow_up_answers(up: RunningUp) -> None:
    client = ollama_client(up)
    asked = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat(MODEL, messages=asked, tools=[ADD, WEATHER])
    calls = first.message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather"]
    assert "city" in calls[0].function.arguments
    streamed = [
        c
        for part in client.chat(
            MODEL,
            messages=[{"role": "user", "content": "add 2 and 3"}],
            tools=[ADD, WEATHER],
            stream=True,
        )
        for c in part.message.tool_calls or []
    ]
    assert [c.function.name for c in streamed] == ["add"]
    follow_up = client.chat(
        MODEL,
        messages=[
            *asked,
            first.message,
            {"role": "tool", "content": "sunny, 21 °C", "tool_name": "get_weather"},
        ],
        tools=[ADD, WEATHER],
    )
    assert follow_up.message.content and not follow_up.message.tool_calls


def test_openai_tool_calls_travel_the_queue_and_the_follow_up_answers(up: RunningUp) -> None:
    client = openai_client(up)
    asked: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model=MODEL, messages=asked, tools=[ADD, WEATHER])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    call: Any = (choice.message.tool_calls or [])[0]
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
    finish = None
    names = []
    for chunk in client.chat.completions.create(
        model=MODEL,
        messages=asked,
        tools=[WEATHER],
        stream=True,
    ):
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            names.append(delta.function.name if delta.function else None)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert names == ["get_weather"] and finish == "tool_calls"
    follow_up = client.chat.completions.create(
        model=MODEL,
        messages=[
            *asked,
            cast(Any, choice.message.model_dump(exclude_none=True)),
            {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 °C"},
        ],
        tools=[WEATHER],
    )
    assert follow_up.choices[0].finish_reason == "stop" and follow_up.choices[0].message.content


def test_langchain_agents_bind_tools_through_the_queue(up: RunningUp) -> None:
    from langchain_core.tools import tool
    from langchain_ollama import ChatOllama
    from langchain_openai import ChatOpenAI
    from pydantic import SecretStr

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather for a city."""
        return f"sunny in {city}"

    via_ollama = ChatOllama(model=MODEL, base_url=up.gateway).bind_tools([get_weather])
    via_openai = ChatOpenAI(
        model=MODEL,
        base_url=f"{up.gateway}/v1",
        api_key=SecretStr("lc-key"),
        max_retries=0,
    ).bind_tools([get_weather])
    for model in (via_ollama, via_openai):
        answer = model.invoke("What is the weather in Paris?")
        assert [c["name"] for c in answer.tool_calls] == ["get_weather"]
        assert "city" in answer.tool_calls[0]["args"]
        merged: Any = None
        for piece in model.stream("What is the weather in Paris?"):
            merged = piece if merged is None else merged + piece
        assert merged is not None
        assert [c["name"] for c in merged.tool_calls] == ["get_weather"]


def test_each_placeholder_key_is_its_own_tenant_and_none_is_an_admin(up: RunningUp) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False}
    reply = httpx.post(
        f"{up.gateway}/api/chat", json=body, headers={"Authorization": "Bearer app-a"}
    )
    request_id = reply.headers["X-Usher-Request-Id"]
    mine = usher_cli(up, "get", request_id, "--retry-for", "0", "--token", "app-a")
    theirs = usher_cli(up, "get", request_id, "--retry-for", "0", "--token", "app-b")
    assert mine.returncode == 0, mine.stderr
    assert theirs.returncode == 3, theirs.stderr  # another tenant's request: not allowed
    admin = httpx.post(
        f"{up.gateway}/admin/queue/update",
        json={"model": MODEL, "queue_limit": 5},
        headers={"Authorization": "Bearer x"},
    )
    assert admin.status_code == 403


def usher_cli(up: RunningUp, *args: str) -> subprocess.CompletedProcess[str]:
    """The ``usher`` CLI as a user runs it, told where the services are (and nothing else)."""
    found = up.wait_for(r"scheduler (\S+) • pool (\S+) • notifier (\S+)", 1)
    env = {
        "PATH": "/usr/bin:/bin",
        "USHER_SCHEDULER_ADDRESS": found.group(1),
        "USHER_POOL_ADDRESS": found.group(2),
        "USHER_NOTIFIER_ADDRESS": found.group(3),
    }
    return subprocess.run(
        [sys.executable, "-m", "clients.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_usher_chat_fails_at_once_on_an_unknown_model_and_answers_a_known_one(
    up: RunningUp,
) -> None:
    unknown = usher_cli(up, "chat", "no-such-model", "hi")
    assert unknown.returncode == 3
    assert "not served" in unknown.stderr and MODEL in unknown.stderr
    known = usher_cli(up, "chat", MODEL, "hi", "--max-tokens", "5")
    assert known.returncode == 0, known.stderr
    assert known.stdout.strip()
