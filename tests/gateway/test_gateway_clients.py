"""The gateway as a process in front of the whole stack (Redis, emulated Ollama fleet, Pool,
Scheduler, Notifier): the official ``ollama`` and ``openai`` clients run against it
unchanged, and the plain HTTP shapes of its errors and ops endpoints."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import ollama
import openai
import pytest

from services.gateway import views
from tests.gateway.conftest import ADMIN, Services
from usher.testing.stack import LocalStack, StackConfig, quick_fleet
from usher.v1 import request_pb2, scheduler_pb2

pytestmark = pytest.mark.slow
MODEL = "llama3.2:1b"
EMBED = "nomic-embed-text"


@pytest.fixture(scope="module", params=["trio", "serve"])
def stack(request: pytest.FixtureRequest) -> Iterator[LocalStack]:
    config = StackConfig(
        all_in_one=request.param == "serve",
        emulator_args=quick_fleet(400),
        scheduler_env={"USHER_DISPATCH_CONCURRENCY": "8"},
        gateway=True,
        gateway_env={"USHER_GATEWAY_DEFAULT_TOKEN": "alice-token"},
    )
    with LocalStack(config) as running:
        # Callers without a token are alice here (a one-desk setup; see the settings).
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # until the Pool has seen the fleet's models
            tags = httpx.get(running.gateway_url + "/api/tags").json()
            if len(tags["models"]) >= 3:
                break
            time.sleep(0.1)
        yield running


@pytest.fixture
async def http(stack: LocalStack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
        yield client


@pytest.fixture
def ollama_client(stack: LocalStack) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=stack.gateway_url)


@pytest.fixture
def openai_client(stack: LocalStack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=stack.gateway_url + "/v1", api_key="bob-token", max_retries=0
    )


# -- the official Ollama client ----------------------------------------------------------


async def test_ollama_chat_streaming_and_not(ollama_client: ollama.AsyncClient) -> None:
    whole = await ollama_client.chat(
        model=MODEL, messages=[{"role": "user", "content": "Tell me about queues"}]
    )
    assert whole.done and whole.done_reason == "stop" and whole.message.role == "assistant"
    assert whole.message.content
    assert whole.eval_count and whole.prompt_eval_count and whole.total_duration
    parts = [
        part
        async for part in await ollama_client.chat(
            model=MODEL,
            messages=[{"role": "user", "content": "Tell me about queues"}],
            stream=True,
        )
    ]
    assert len(parts) >= 2 and parts[-1].done and not any(p.done for p in parts[:-1])
    streamed = "".join(p.message.content or "" for p in parts)
    # Same prompt, no seed: a different sample, but a whole answer of its own.
    assert streamed and parts[-1].eval_count and parts[-1].eval_duration


async def test_ollama_generate_streaming_and_not(ollama_client: ollama.AsyncClient) -> None:
    whole = await ollama_client.generate(
        model=MODEL, prompt="Why is the sky blue?", options={"seed": 3, "temperature": 0}
    )
    assert whole.response and whole.done
    parts = [
        p
        async for p in await ollama_client.generate(
            model=MODEL, prompt="Why is the sky blue?", stream=True, options={"seed": 4}
        )
    ]
    assert parts[-1].done and "".join(p.response or "" for p in parts)


async def test_ollama_embed_embeddings_and_metadata(ollama_client: ollama.AsyncClient) -> None:
    embedded = await ollama_client.embed(model=EMBED, input=["one", "two"])
    assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) > 10
    legacy = await ollama_client.embeddings(model=EMBED, prompt="one")
    assert len(legacy.embedding) == len(embedded.embeddings[0])
    listed = await ollama_client.list()
    names = {m.model for m in listed.models}
    assert {MODEL, "qwen2.5:0.5b", "nomic-embed-text:latest"} <= names
    assert all(m.size for m in listed.models)
    for _ in range(100):  # the Pool sees what is loaded on its next health check
        running = await ollama_client.ps()
        if MODEL in {m.model for m in running.models}:  # loaded by the chats above
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail(f"{MODEL} never showed in /api/ps")
    assert all(m.size and m.expires_at for m in running.models)
    shown = await ollama_client.show(MODEL)
    assert shown.details is not None and shown.details.family == "llama"
    assert shown.modelinfo


async def test_ollama_client_sees_ollamas_errors(ollama_client: ollama.AsyncClient) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        await ollama_client.chat(model="nope:7b", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 404 and info.value.error == "model 'nope:7b' not found"
    with pytest.raises(ollama.ResponseError) as info:
        await ollama_client.show("nope:7b")
    assert info.value.status_code == 404


# -- the official OpenAI client ----------------------------------------------------------


async def test_openai_chat_streaming_and_not(openai_client: openai.AsyncOpenAI) -> None:
    completion = await openai_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello"}]
    )
    choice = completion.choices[0]
    assert choice.message.content and choice.finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    stream = await openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


async def test_openai_embeddings_and_models(openai_client: openai.AsyncOpenAI) -> None:
    # The client asks for base64 and decodes it.
    embedded = await openai_client.embeddings.create(model=EMBED, input=["a", "b"])
    assert len(embedded.data) == 2 and len(embedded.data[0].embedding) > 10
    models = [m.id async for m in openai_client.models.list()]
    assert MODEL in models
    with pytest.raises(openai.NotFoundError):
        await openai_client.chat.completions.create(
            model="nope:7b", messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(openai.BadRequestError) as info:
        await openai_client.chat.completions.create(model=MODEL, messages=[])
    assert info.value.param == "messages"


# -- plain HTTP: headers, errors ---------------------------------------------------------


async def test_headers_carry_priority_and_report_the_request(
    http: httpx.AsyncClient, services: Services
) -> None:
    reply = await http.post(
        "/api/generate",
        json={"model": MODEL, "prompt": "prioritised", "stream": False},
        headers={
            "Authorization": "Bearer carol-token",
            "X-Usher-Priority": "high",
            "X-Usher-Fallback": "local_only",
        },
    )
    assert reply.status_code == 200
    request_id = reply.headers["X-Usher-Request-Id"]
    assert int(reply.headers["X-Usher-Queue-Wait-Ms"]) >= 0
    stored = await services.get(request_id)
    assert stored.priority == request_pb2.PRIORITY_HIGH
    assert stored.fallback_policy == request_pb2.FALLBACK_POLICY_LOCAL_ONLY
    assert stored.tenant.user == "carol"
    assert stored.state == request_pb2.REQUEST_STATE_COMPLETED
    assert stored.result.text == reply.json()["response"]


async def test_error_codes(http: httpx.AsyncClient) -> None:
    missing = await http.post("/api/generate", json={"model": "nope:7b", "prompt": "x"})
    assert missing.status_code == 404
    assert missing.json() == {
        "error": "model 'nope:7b' not found",
        "code": "model_not_found",
        "model": "nope:7b",
        "field": "model",
    }
    bad_json = await http.post("/api/chat", content=b"{nope")
    assert bad_json.status_code == 400 and bad_json.json()["field"] == "body"
    no_model = await http.post("/api/chat", json={"messages": []})
    assert no_model.status_code == 400 and no_model.json()["error"] == "model is required"
    bad_role = await http.post(
        "/api/chat", json={"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}
    )
    assert bad_role.status_code == 400 and bad_role.json()["field"] == "messages[0].role"
    # Checked by the Scheduler (INVALID_ARGUMENT with a field violation), named as in HTTP.
    blank = await http.post(
        "/api/generate", json={"model": MODEL, "prompt": "   ", "stream": False}
    )
    assert blank.status_code == 400 and blank.json()["field"] == "prompt"
    bad_header = await http.post(
        "/api/generate",
        json={"model": MODEL, "prompt": "x"},
        headers={"X-Usher-Priority": "urgent"},
    )
    assert bad_header.status_code == 400
    assert bad_header.json()["field"] == "X-Usher-Priority"
    stranger = await http.post(
        "/api/generate",
        json={"model": MODEL, "prompt": "x"},
        headers={"Authorization": "Bearer who-knows"},
    )
    assert stranger.status_code == 401 and stranger.json()["code"] == "unauthorized"
    openai_missing = await http.post(
        "/v1/chat/completions",
        json={"model": "nope:7b", "messages": [{"role": "user", "content": "x"}]},
    )
    assert openai_missing.status_code == 404
    assert openai_missing.json()["error"] == {
        "message": "model 'nope:7b' not found",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


async def test_load_requests_and_metadata_routes(http: httpx.AsyncClient) -> None:
    loaded = await http.post("/api/generate", json={"model": MODEL})
    assert loaded.json()["done_reason"] == "load"
    assert (await http.get("/")).text == "Ollama is running"
    assert "version" in (await http.get("/api/version")).json()
    assert (await http.post("/api/push", json={"model": MODEL})).status_code == 501
    # Pulling needs an operator's own token (never the gateway's default one).
    assert (await http.post("/api/pull", json={"model": MODEL})).status_code == 401


# -- ops endpoints -----------------------------------------------------------------------


QUEUE_FIELDS = {
    "model",
    "parallel_limit",
    "queue_limit",
    "active_requests",
    "queued_requests",
    "available_slots",
    "queue_available",
    "total_processed",
    "total_rejected",
    "avg_wait_time_ms",
    "avg_processing_time_ms",
    "uptime_seconds",
}


async def test_queue_stats_memory_and_health(http: httpx.AsyncClient) -> None:
    await http.post("/api/generate", json={"model": MODEL, "prompt": "count me", "stream": False})
    operator = {"Authorization": "Bearer admin-token"}
    stats = (await http.get("/queue/stats", headers=operator)).json()
    assert {"default_parallel", "default_queue_limit", "total_models", "models"} <= set(stats)
    llama = stats["models"][MODEL]
    assert set(llama) >= QUEUE_FIELDS
    assert llama["parallel_limit"] == 4  # two instances, two slots each
    assert llama["total_processed"] >= 1 and llama["queue_limit"] == 100
    one = await http.get("/queue/stats", params={"model": MODEL}, headers=operator)
    assert one.status_code == 200 and set(one.json()) >= QUEUE_FIELDS
    assert (await http.get("/queue/stats", params={"model": "nope:7b"})).status_code == 404
    # Anyone else sees a model picker's figures, never the operators' counters.
    for headers in ({}, {"Authorization": "Bearer bob-token"}):
        public = (await http.get("/queue/stats", headers=headers)).json()
        assert public["scope"] == "public"
        assert set(public["models"][MODEL]) == set(views.PUBLIC_QUEUE_FIELDS)
        assert "total_processed" not in public["models"][MODEL]
    memory = (await http.get("/queue/memory")).json()
    assert set(memory) == {"total_gb", "available_gb", "used_gb", "percent", "recommended_parallel"}
    assert memory["recommended_parallel"] in (1, 2, 4)
    health = await http.get("/health")
    body = health.json()
    assert health.status_code == 200 and body["status"] == "healthy"
    assert body["services"] == {"scheduler": "serving", "notifier": "serving", "pool": "serving"}
    assert {"default_parallel", "default_queue_limit", "total_models", "memory"} <= set(
        body["concurrency"]
    )
    assert body["fleet"]["healthy"] == 2 and "timestamp" in body


async def test_admin_endpoints_need_an_admin(http: httpx.AsyncClient, services: Services) -> None:
    body = {"model": "qwen2.5:0.5b", "queue_limit": 50, "parallel_limit": 3}
    assert (await http.post("/admin/queue/update", json=body)).status_code == 401
    denied = await http.post(
        "/admin/queue/update", json=body, headers={"Authorization": "Bearer alice-token"}
    )
    assert denied.status_code == 403
    updated = await http.post(
        "/admin/queue/update", json=body, headers={"Authorization": "Bearer admin-token"}
    )
    assert updated.status_code == 200
    assert updated.json()["queue_limit"] == 50 and updated.json()["parallel_limit"] == 3
    stats = await services.admin.GetQueueStats(
        scheduler_pb2.GetQueueStatsRequest(models=["qwen2.5:0.5b"]), metadata=ADMIN
    )
    assert stats.stats[0].config.max_queue_size == 50
    nothing = await http.post(
        "/admin/queue/update",
        json={"model": "qwen2.5:0.5b"},
        headers={"Authorization": "Bearer admin-token"},
    )
    assert nothing.status_code == 400
    await http.post(
        "/admin/queue/update",
        json={"model": "qwen2.5:0.5b", "queue_limit": 100},
        headers={"Authorization": "Bearer admin-token"},
    )
    await http.post("/api/generate", json={"model": MODEL, "prompt": "before", "stream": False})
    assert (await http.post("/admin/queue/reset")).status_code == 401
    reset = await http.post("/admin/queue/reset", headers={"Authorization": "Bearer admin-token"})
    assert reset.status_code == 200 and MODEL in reset.json()["models"]
    after = (
        await http.get(
            "/queue/stats", params={"model": MODEL}, headers={"Authorization": "Bearer admin-token"}
        )
    ).json()
    assert after["total_processed"] == 0
    # The counters were reset in the shared store, not in this gateway's view.
    shared = await services.admin.GetQueueStats(
        scheduler_pb2.GetQueueStatsRequest(models=[MODEL]), metadata=ADMIN
    )
    assert shared.stats[0].completed == 0


async def test_metrics(http: httpx.AsyncClient) -> None:
    await http.get("/api/version")
    text = (await http.get("/metrics")).text
    assert 'usher_gateway_requests_total{method="GET",route="/api/version",status="200"}' in text
    assert "usher_gateway_request_seconds_bucket" in text
    assert "usher_gateway_in_flight" in text
    assert 'usher_gateway_errors_total{code="model_not_found"}' in text
    assert "process_resident_memory_bytes" in text


async def test_a_page_without_a_token_waits_on_the_default_tenant(
    http: httpx.AsyncClient,
) -> None:
    """With a default token (or the local open mode) the page sends no Authorization at
    all: submitting, the badge token and the request's stream still work, through the
    watch-token cookie."""
    reply = await http.post(
        "/queue/requests",
        json={"model": MODEL, "messages": [{"role": "user", "content": "no token here"}]},
    )
    assert reply.status_code == 202, reply.text
    body = reply.json()
    assert reply.cookies["usher_watch"] == body["watch_token"]
    badges = await http.post("/queue/watch-tokens", json={})
    assert badges.status_code == 200 and badges.json()["scope"] == "queues"
    async with http.stream(
        "GET",
        f"/queue/requests/{body['id']}/events",
        headers={"Cookie": f"usher_watch={body['watch_token']}"},
    ) as stream:
        assert stream.status_code == 200
        lines = [line async for line in stream.aiter_lines()]
    assert "event: end" in lines
    page = await http.get("/ui")
    assert page.status_code == 200 and "<title>Usher</title>" in page.text
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    script = await http.get("/ui/app.js")
    assert script.status_code == 200 and script.headers["Content-Type"].startswith(
        "text/javascript"
    )
    assert (await http.get("/ui/../app.py")).status_code == 404
