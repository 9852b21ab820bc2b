"""Wire-level behaviour (httpx): status codes and bodies, load/unload, keep-alive,
slots, queue limits, reloads, eviction, injected faults, OpenAI endpoints."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx
import pytest

from usher.emulator import (
    MAX_QUEUE_MESSAGE,
    RUNNER_STOPPED_MESSAGE,
    EmulatorFleet,
    EmulatorServer,
)

from .helpers import GiB, fast_config, gib_models, ndjson, wait_until

GEN = "/api/generate"


def _gen(model: str = "llama3.2:1b", **extra: Any) -> dict[str, Any]:
    return {"model": model, "prompt": "hello", **extra}


# -- basics and error bodies ---------------------------------------------------------


async def test_health_version_and_unknown_routes(client: httpx.AsyncClient) -> None:
    root = await client.get("/")
    assert (root.status_code, root.text) == (200, "Ollama is running")
    assert (await client.head("/")).status_code == 200
    assert (await client.get("/api/version")).json() == {"version": "0.32.15"}
    missing = await client.get("/api/nothing")
    assert (missing.status_code, missing.text) == (404, "404 page not found")


async def test_error_bodies(client: httpx.AsyncClient) -> None:
    async def err(path: str, body: Any = None, content: bytes | None = None) -> tuple[int, Any]:
        if content is not None:
            r = await client.post(path, content=content)
        else:
            r = await client.post(path, json=body)
        assert r.headers["content-type"].startswith("application/json")
        return r.status_code, r.json()

    assert await err(GEN, _gen("nope:1b")) == (404, {"error": "model 'nope:1b' not found"})
    assert await err("/api/chat", {"model": "nope", "messages": []}) == (
        404,
        {"error": "model 'nope' not found"},
    )
    assert await err("/api/embed", {"model": "nope", "input": "x"}) == (
        404,
        {"error": "model 'nope' not found"},
    )
    assert await err("/api/embeddings", {"model": "nope", "prompt": "x"}) == (
        404,
        {"error": 'model "nope" not found, try pulling it first'},
    )
    assert await err("/api/show", {"model": "nope"}) == (
        404,
        {"error": "model 'nope:latest' not found"},
    )
    assert await err(GEN, content=b"") == (400, {"error": "missing request body"})
    assert await err(GEN, content=b"{oops") == (
        400,
        {"error": "invalid character 'o' looking for beginning of value"},
    )
    assert await err(GEN, {"model": "llama3.2:1b", "prompt": 7}) == (
        400,
        {
            "error": "json: cannot unmarshal number into Go struct field GenerateRequest.prompt "
            "of type string"
        },
    )
    assert await err("/api/chat", {"messages": []}) == (400, {"error": "model is required"})
    assert await err(GEN, {"model": "bad name!", "prompt": "x"}) == (
        400,
        {"error": "invalid model name"},
    )
    assert await err(GEN, _gen(keep_alive="-1")) == (
        400,
        {"error": 'time: missing unit in duration "-1"'},
    )
    assert await err(
        "/api/chat", {"model": "nomic-embed-text", "messages": [{"role": "user", "content": "x"}]}
    ) == (
        400,
        {"error": '"nomic-embed-text" does not support chat'},
    )
    assert await err(GEN, _gen(think=True)) == (
        400,
        {"error": '"llama3.2:1b" does not support thinking'},
    )
    assert await err("/api/embed", {"model": "nomic-embed-text", "input": [1]}) == (
        400,
        {"error": "invalid input type"},
    )


async def test_stream_and_final_chunk_shape(client: httpx.AsyncClient) -> None:
    r = await client.post(GEN, json=_gen(options={"num_predict": 4}))
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/x-ndjson"
    lines = ndjson(r)
    assert [line["done"] for line in lines] == [False] * 4 + [True]
    final = lines[-1]
    assert list(final) == [
        "model",
        "created_at",
        "response",
        "done",
        "done_reason",
        "context",
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    ]
    assert final["response"] == ""
    assert final["done_reason"] == "length"
    assert final["eval_count"] == 4
    assert all(isinstance(final[k], int) and final[k] > 0 for k in list(final)[6:])
    assert final["total_duration"] >= final["load_duration"]
    datetime.fromisoformat(final["created_at"])

    whole = (await client.post(GEN, json=_gen(options={"num_predict": 4}, stream=False))).json()
    assert whole["response"] == "".join(line["response"] for line in lines)

    chat = await client.post(
        "/api/chat",
        json={
            "model": "llama3.2:1b",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": False,
            "format": {
                "type": "object",
                "properties": {"age": {"type": "integer"}, "ok": {"type": "boolean"}},
            },
        },
    )
    body = chat.json()
    assert list(body)[:5] == ["model", "created_at", "message", "done", "done_reason"]
    assert set(json.loads(body["message"]["content"])) == {"age", "ok"}


async def test_load_unload_and_keep_alive_expiry(
    client: httpx.AsyncClient, emulator: EmulatorServer
) -> None:
    r = await client.post(GEN, json={"model": "llama3.2:1b", "keep_alive": "300ms"})
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert (body["done"], body["done_reason"], body["response"]) == (True, "load", "")
    [entry] = (await client.get("/api/ps")).json()["models"]
    assert entry["name"] == "llama3.2:1b"
    expires = datetime.fromisoformat(entry["expires_at"])
    remaining = expires.timestamp() - time.time()
    assert 0 < remaining <= 0.4
    assert entry["size"] == entry["size_vram"] == 1_321_098_329
    assert entry["context_length"] == 4096
    await asyncio.sleep(0.5)
    assert (await client.get("/api/ps")).json() == {"models": []}
    assert emulator.stats.expirations == 1

    # keep_alive -1: forever; unload with an empty prompt and keep_alive 0.
    await client.post("/api/chat", json={"model": "qwen2.5:0.5b", "messages": [], "keep_alive": -1})
    [entry] = (await client.get("/api/ps")).json()["models"]
    assert datetime.fromisoformat(entry["expires_at"]).year > 2200
    r = await client.post(
        "/api/chat", json={"model": "qwen2.5:0.5b", "messages": [], "keep_alive": 0}
    )
    assert r.json()["done_reason"] == "unload"
    assert r.json()["message"] == {"role": "assistant", "content": ""}
    assert (await client.get("/api/ps")).json() == {"models": []}
    assert emulator.stats.loads == 2


# -- scheduler behaviour over HTTP ----------------------------------------------------------


async def test_parallel_slots(make_server: Callable[..., EmulatorServer]) -> None:
    async with (
        make_server(num_parallel=2, tokens_per_second=200, output_tokens=(10, 10)) as srv,
        httpx.AsyncClient(base_url=srv.url, timeout=10) as c,
    ):
        await c.post(GEN, json={"model": "llama3.2:1b"})  # load first
        started = time.perf_counter()
        rs = await asyncio.gather(
            *(c.post(GEN, json=_gen(prompt=f"p{i}", stream=False)) for i in range(6))
        )
        elapsed = time.perf_counter() - started
    assert all(r.status_code == 200 for r in rs)
    model = srv.stats.model("llama3.2:1b")
    assert model.in_flight_max == 2
    assert model.requests == 6
    # 6 requests of 50 ms through 2 slots take 3 rounds.
    assert elapsed >= 0.14
    assert srv.stats.queue_depth_max >= 3
    # Waiting is charged as load_duration, like Ollama's scheduling checkpoint.
    waits = sorted(r.json()["load_duration"] for r in rs)
    assert waits[-1] > 0.08e9


async def test_waiting_requests_are_served_fifo(
    make_server: Callable[..., EmulatorServer],
) -> None:
    async with (
        make_server(num_parallel=1, tokens_per_second=400, output_tokens=(8, 8)) as srv,
        httpx.AsyncClient(base_url=srv.url, timeout=10) as c,
    ):
        await c.post(GEN, json={"model": "llama3.2:1b"})
        done: list[int] = []

        async def one(i: int) -> None:
            r = await c.post(GEN, json=_gen(prompt=f"p{i}", stream=False))
            assert r.status_code == 200
            done.append(i)

        model = srv.stats.model("llama3.2:1b")

        def arrived(n: int) -> Callable[[], bool]:
            # Granted so far (running or finished) plus waiting: a request has arrived.
            return lambda: model.requests + srv.stats.queue_depth >= n

        tasks = []
        for i in range(5):
            tasks.append(asyncio.create_task(one(i)))
            await wait_until(arrived(i + 1))  # fixes the arrival order
        await asyncio.gather(*tasks)
    assert done == [0, 1, 2, 3, 4]


async def test_queue_full_is_503(make_server: Callable[..., EmulatorServer]) -> None:
    async with (
        make_server(
            num_parallel=1, max_queue=2, tokens_per_second=100, output_tokens=(20, 20)
        ) as srv,
        httpx.AsyncClient(base_url=srv.url, timeout=10) as c,
    ):
        await c.post(GEN, json={"model": "llama3.2:1b"})
        running = [asyncio.create_task(c.post(GEN, json=_gen(stream=False))) for _ in range(3)]
        await wait_until(lambda: srv.stats.queue_depth >= 2)
        busy = await c.post(GEN, json=_gen())
        assert busy.status_code == 503
        assert busy.json() == {"error": MAX_QUEUE_MESSAGE}
        assert MAX_QUEUE_MESSAGE == (
            "server busy, please try again.  maximum pending requests exceeded"
        )
        assert all(r.status_code == 200 for r in await asyncio.gather(*running))
    assert srv.stats.requests_rejected == 1


async def test_num_ctx_change_forces_reload(
    client: httpx.AsyncClient, emulator: EmulatorServer
) -> None:
    await client.post(GEN, json=_gen(stream=False, options={"num_ctx": 2048}))
    await client.post(GEN, json=_gen(stream=False, options={"num_ctx": 2048}))
    assert emulator.stats.loads == 1
    [entry] = (await client.get("/api/ps")).json()["models"]
    assert entry["context_length"] == 2048
    r = await client.post(GEN, json=_gen(stream=False, options={"num_ctx": 8192}))
    assert r.json()["load_duration"] >= 0.02e9  # paid a load again
    assert (emulator.stats.loads, emulator.stats.reloads) == (2, 1)
    [entry] = (await client.get("/api/ps")).json()["models"]
    assert entry["context_length"] == 8192
    # No num_ctx means the default (4096): another reload, as in Ollama.
    await client.post(GEN, json=_gen(stream=False))
    assert emulator.stats.reloads == 2


async def test_lru_eviction_under_memory_budget(make_server: Callable[..., EmulatorServer]) -> None:
    async with (
        make_server(models=gib_models("a:1b", "b:1b", "c:1b"), memory_budget=int(2.5 * GiB)) as srv,
        httpx.AsyncClient(base_url=srv.url, timeout=10) as c,
    ):
        for name in ("a:1b", "b:1b", "a:1b", "c:1b"):
            r = await c.post(GEN, json=_gen(name, stream=False))
            assert r.status_code == 200
        names = sorted(m["name"] for m in (await c.get("/api/ps")).json()["models"])
        assert names == ["a:1b", "c:1b"]
        stats = (await c.get("/_emulator/stats")).json()
    assert stats["loads"] == 3
    assert stats["evictions"] == 1
    assert stats["models"]["b:1b"]["evictions"] == 1
    assert stats["memory_used"] == 2 * GiB


async def test_max_loaded_models_waits_for_busy_model(
    make_server: Callable[..., EmulatorServer],
) -> None:
    async with (
        make_server(max_loaded_models=1, tokens_per_second=100, output_tokens=(15, 15)) as srv,
        httpx.AsyncClient(base_url=srv.url, timeout=10) as c,
    ):
        long = asyncio.create_task(c.post(GEN, json=_gen("llama3.2:1b", stream=False)))
        await wait_until(lambda: srv.stats.in_flight > 0)
        other = await c.post(GEN, json=_gen("qwen2.5:0.5b", stream=False))
        first = await long
    assert first.status_code == other.status_code == 200
    # The second model could only load after the first finished and was evicted.
    assert other.json()["load_duration"] >= 0.1e9
    assert srv.stats.evictions == 1
    assert srv.stats.models["llama3.2:1b"].in_flight_max == 1


# -- faults -------------------------------------------------------------------------------


async def test_mid_stream_error_line(client: httpx.AsyncClient, emulator: EmulatorServer) -> None:
    emulator.set_faults(error_after_tokens=3)
    r = await client.post(GEN, json=_gen())
    assert r.status_code == 200
    lines = ndjson(r)
    assert len(lines) == 4
    assert lines[-1] == {"error": RUNNER_STOPPED_MESSAGE}
    assert all(not line["done"] for line in lines[:3])

    r = await client.post(GEN, json=_gen(stream=False))
    assert (r.status_code, r.json()) == (500, {"error": RUNNER_STOPPED_MESSAGE})

    # Before the first token there is nothing written yet: a plain 500.
    emulator.set_faults(error_after_tokens=0, error_message="boom")
    r = await client.post(
        "/api/chat", json={"model": "llama3.2:1b", "messages": [{"role": "user", "content": "x"}]}
    )
    assert (r.status_code, r.json()) == (500, {"error": "boom"})
    emulator.clear_faults()
    assert (await client.post(GEN, json=_gen(stream=False))).status_code == 200


async def test_fail_next_and_admin_endpoints(
    client: httpx.AsyncClient, emulator: EmulatorServer
) -> None:
    r = await client.post("/_emulator/faults", json={"fail_next": 2, "fail_status": 500})
    assert r.json()["fail_next"] == 2
    statuses = [(await client.post(GEN, json=_gen(stream=False))).status_code for _ in range(3)]
    assert statuses == [500, 500, 200]
    bad = await client.post("/_emulator/faults", json={"nonsense": 1})
    assert bad.status_code == 400
    stats = (await client.get("/_emulator/stats")).json()
    assert stats["requests_failed"] == 2
    assert stats["models"]["llama3.2:1b"]["requests"] == 1
    cfg = (await client.post("/_emulator/config", json={"tokens_per_second": 500})).json()
    assert cfg["tokens_per_second"] == 500
    reset = (await client.post("/_emulator/reset")).json()
    assert reset["requests_failed"] == 0


async def test_hang_and_drop(client: httpx.AsyncClient, emulator: EmulatorServer) -> None:
    await client.post("/_emulator/faults", json={"hang": True})
    with pytest.raises(httpx.ReadTimeout):
        await client.get("/", timeout=0.2)
    assert (await client.get("/_emulator/faults")).json()["hang"] is True  # admin still answers
    await client.delete("/_emulator/faults")
    assert (await client.get("/")).status_code == 200

    emulator.set_faults(drop_after_tokens=2, drop_times=1)
    with pytest.raises(httpx.RemoteProtocolError):  # noqa: PT012 - the drop happens mid-read
        async with client.stream("POST", GEN, json=_gen()) as resp:
            async for _ in resp.aiter_lines():
                pass
    assert emulator.faults.drop_after_tokens is None  # used up
    assert emulator.stats.model("llama3.2:1b").in_flight == 0  # slot released
    assert (await client.post(GEN, json=_gen(stream=False))).status_code == 200


async def test_in_process_crash_and_restart() -> None:
    async with EmulatorFleet(2, config=fast_config()) as fleet:
        assert len(set(fleet.urls)) == 2
        url = fleet.urls[0]
        async with httpx.AsyncClient(timeout=5) as c:
            await c.post(url + GEN, json=_gen(stream=False))
            fleet[0].set_faults(crash_after_tokens=2)
            with pytest.raises(httpx.TransportError):  # noqa: PT012
                async with c.stream("POST", url + GEN, json=_gen()) as resp:
                    async for _ in resp.aiter_lines():
                        pass
            await asyncio.sleep(0.1)
            assert fleet[0].crashed
            with pytest.raises(httpx.ConnectError):
                await c.get(url + "/")
            assert (await c.get(fleet.urls[1] + "/")).status_code == 200  # sibling unaffected
            fleet[0].clear_faults()
            assert await fleet[0].restart() == url
            assert (await c.get(url + "/api/ps")).json() == {"models": []}
            assert (await c.post(url + GEN, json=_gen(stream=False))).status_code == 200


# -- OpenAI-compatible endpoints ------------------------------------------------------------


def _sse(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.split("\n\n") if line.startswith("data: ")]


async def test_openai_chat(client: httpx.AsyncClient) -> None:
    body = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "hi"}]}
    r = await client.post("/v1/chat/completions", json={**body, "max_tokens": 5})
    done = r.json()
    assert done["object"] == "chat.completion"
    assert done["id"].startswith("chatcmpl-")
    assert done["system_fingerprint"] == "fp_ollama"
    assert done["choices"][0]["finish_reason"] == "length"
    assert done["choices"][0]["message"]["role"] == "assistant"
    assert done["usage"]["completion_tokens"] == 5

    r = await client.post(
        "/v1/chat/completions",
        json={**body, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert r.headers["content-type"] == "text/event-stream"
    events = _sse(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "role" not in chunks[1]["choices"][0]["delta"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == done["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length"}
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 5

    r = await client.post("/v1/chat/completions", json={**body, "model": "nope"})
    assert r.status_code == 404
    assert r.json() == {
        "error": {
            "message": "model 'nope' not found",
            "type": "not_found_error",
            "param": None,
            "code": None,
        }
    }
    r = await client.post("/v1/chat/completions", json={"model": "llama3.2:1b", "messages": []})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "[] is too short - 'messages'"


async def test_openai_completions_embeddings_models(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/completions", json={"model": "qwen2.5:0.5b", "prompt": "x", "max_tokens": 3}
    )
    assert r.json()["object"] == "text_completion"
    assert r.json()["choices"][0]["finish_reason"] == "length"
    r = await client.post(
        "/v1/completions",
        json={"model": "qwen2.5:0.5b", "prompt": "x", "max_tokens": 3, "stream": True},
    )
    events = _sse(r.text)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"

    r = await client.post("/v1/embeddings", json={"model": "nomic-embed-text", "input": ["a", "b"]})
    data = r.json()
    assert data["object"] == "list"
    assert len(data["data"]) == 2
    vec = data["data"][1]["embedding"]
    r = await client.post(
        "/v1/embeddings",
        json={"model": "nomic-embed-text", "input": "b", "encoding_format": "base64"},
    )
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(vec, abs=1e-6)
    r = await client.post("/v1/embeddings", json={"model": "nomic-embed-text", "input": []})
    assert (r.status_code, r.json()["error"]["message"]) == (400, "invalid input")

    models = (await client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]][:2] == ["llama3.2:1b", "qwen2.5:0.5b"]
    assert models["data"][0]["owned_by"] == "library"
    one = await client.get("/v1/models/llama3.2:1b")
    assert one.json()["id"] == "llama3.2:1b"
    assert (await client.get("/v1/models/nope")).status_code == 404
