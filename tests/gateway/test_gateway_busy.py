"""The gateway in front of a slow, busy fleet: a full queue answers 503 ``queue_full`` with
Retry-After (429 for OpenAI clients), a queue timeout 504 ``timeout``, and a client that
disconnects gets its queued or running request cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import cast

import grpc
import httpx
import openai
import pytest

from tests.gateway.conftest import ADMIN, Services, auth
from usher.testing.stack import LocalStack, StackConfig
from usher.v1 import request_pb2, scheduler_pb2

pytestmark = pytest.mark.slow
LLAMA, QWEN, GEMMA = "llama3.2:1b", "qwen2.5:0.5b", "gemma3:1b"
SLOTS = 4  # two instances, two slots per model each
S = request_pb2


@pytest.fixture(scope="module", params=["trio", "serve"])
def stack(request: pytest.FixtureRequest) -> Iterator[LocalStack]:
    config = StackConfig(
        all_in_one=request.param == "serve",
        emulator_args=(
            "--fleet",
            "2",
            "--models",
            f"{LLAMA},{QWEN},{GEMMA},nomic-embed-text",
            "--max-loaded-models",
            "4",
            # Slow: every answer takes 5-10 s, so a few requests keep the fleet busy.
            "--tokens-per-second",
            "4",
            "--load-time",
            "0.05",
            "--parallel",
            "2",
            "--output-tokens",
            "20:40",
        ),
        # A short lease: heartbeats (which carry a cancel to a running request) every 1 s.
        scheduler_env={"USHER_DISPATCH_CONCURRENCY": "16", "USHER_LEASE_SECONDS": "3"},
        gateway=True,
    )
    with LocalStack(config) as running:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if len(httpx.get(running.gateway_url + "/api/tags").json()["models"]) >= 4:
                break
            time.sleep(0.1)
        yield running


@pytest.fixture
async def http(stack: LocalStack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=stack.gateway_url, timeout=30, headers={"Authorization": "Bearer alice-token"}
    ) as client:
        yield client


class Fleet:
    """Keeps a model's slots busy with bob's requests; cancels them all afterwards."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.ids: list[str] = []

    async def stats(self, model: str) -> scheduler_pb2.QueueStats:
        reply = await self.services.admin.GetQueueStats(
            scheduler_pb2.GetQueueStatsRequest(models=[model]), metadata=ADMIN, timeout=5
        )
        return reply.stats[0]

    async def occupy(self, model: str, queued: int = 0, timeout: float = 15.0) -> None:
        """Until every slot of ``model`` runs one of bob's requests and ``queued`` wait."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = await self.stats(model)
            if stats.running >= SLOTS and stats.queued >= queued:
                return
            if stats.running + stats.queued < SLOTS + queued:
                try:
                    reply = await self.services.scheduler.Submit(
                        scheduler_pb2.SubmitRequest(
                            model=model,
                            generate=S.GenerateInput(prompt=f"busy work {len(self.ids)}"),
                        ),
                        metadata=auth("bob"),
                        timeout=5,
                    )
                    self.ids.append(reply.request.id)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
            await asyncio.sleep(0.05)
        raise AssertionError(f"could not keep {model} busy: {await self.stats(model)}")

    async def release(self) -> None:
        for request_id in self.ids:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self.services.scheduler.Cancel(
                    scheduler_pb2.CancelRequest(id=request_id, reason="test over"),
                    metadata=ADMIN,
                    timeout=5,
                )


@pytest.fixture
async def fleet(services: Services) -> AsyncIterator[Fleet]:
    busy = Fleet(services)
    yield busy
    await busy.release()


async def newest(services: Services, user: str, model: str, seen: set[str]) -> str:
    """The id of ``user``'s newest request for ``model`` not in ``seen`` (polls)."""
    for _ in range(100):
        listed = await services.scheduler.List(
            scheduler_pb2.ListRequest(model=model, page_size=20), metadata=auth(user), timeout=5
        )
        for request in listed.requests:
            if request.id not in seen:
                return request.id
        await asyncio.sleep(0.05)
    raise AssertionError(f"no new request of {user} for {model}")


async def test_a_full_queue_answers_503_queue_full_with_retry_after(
    stack: LocalStack, http: httpx.AsyncClient, services: Services, fleet: Fleet
) -> None:
    await services.admin.UpdateQueueConfig(
        scheduler_pb2.UpdateQueueConfigRequest(model=QWEN, max_queue_size=1), metadata=ADMIN
    )
    try:
        await fleet.occupy(QWEN, queued=1)
        reply = await http.post("/api/generate", json={"model": QWEN, "prompt": "me too"})
        assert reply.status_code == 503
        body = reply.json()
        assert body["error"] == "queue_full" and body["model"] == QWEN and body["message"]
        assert int(reply.headers["Retry-After"]) >= 1
        client = openai.AsyncOpenAI(
            base_url=stack.gateway_url + "/v1", api_key="alice-token", max_retries=0
        )
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(
                model=QWEN, messages=[{"role": "user", "content": "me too"}]
            )
        assert info.value.status_code == 429
        assert int(info.value.response.headers["Retry-After"]) >= 1
        assert info.value.code == "queue_full"
        stats = (
            await http.get(
                "/queue/stats",
                params={"model": QWEN},
                headers={"Authorization": "Bearer admin-token"},
            )
        ).json()
        assert stats["queue_limit"] == 1 and stats["queue_available"] == 0
        assert stats["active_requests"] == SLOTS and stats["available_slots"] == 0
        assert stats["total_rejected"] >= 2
    finally:
        await services.admin.UpdateQueueConfig(
            scheduler_pb2.UpdateQueueConfigRequest(model=QWEN, max_queue_size=100),
            metadata=ADMIN,
        )


async def test_a_queue_timeout_answers_504_timeout(
    http: httpx.AsyncClient, services: Services, fleet: Fleet
) -> None:
    await fleet.occupy(LLAMA)
    short = {"X-Usher-Queue-Timeout": "0.4"}
    reply = await http.post(
        "/api/generate",
        json={"model": LLAMA, "prompt": "in a hurry", "stream": False},
        headers=short,
    )
    assert reply.status_code == 504, reply.text
    assert reply.json()["error"] == "timeout" and reply.json()["model"] == LLAMA
    expired = await services.get(reply.headers["X-Usher-Request-Id"])
    assert expired.state == S.REQUEST_STATE_EXPIRED
    # A stream's headers went out when it was queued: the timeout is its last line, as
    # Ollama reports errors after the headers.
    streamed = await http.post(
        "/api/generate", json={"model": LLAMA, "prompt": "in a hurry"}, headers=short
    )
    assert streamed.status_code == 200
    last = json.loads(streamed.text.strip().splitlines()[-1])
    assert last["code"] == "timeout" and last["error"]
    # A deadline (the whole answer's time budget) ends the same way.
    late = await http.post(
        "/api/generate",
        json={"model": LLAMA, "prompt": "in a hurry", "stream": False},
        headers={"X-Usher-Deadline": "0.4"},
    )
    assert late.status_code == 504 and late.json()["error"] == "timeout"
    openai_reply = await http.post(
        "/v1/chat/completions",
        json={"model": LLAMA, "messages": [{"role": "user", "content": "hurry"}]},
        headers=short,
    )
    assert openai_reply.status_code == 504
    assert openai_reply.json()["error"]["code"] == "timeout"


async def test_a_client_that_leaves_the_queue_cancels_its_request(
    http: httpx.AsyncClient, services: Services, fleet: Fleet
) -> None:
    await fleet.occupy(LLAMA)
    seen: set[str] = set()
    for stream in (True, False):
        call = asyncio.create_task(
            http.post(
                "/api/chat",
                json={
                    "model": LLAMA,
                    "messages": [{"role": "user", "content": "I will not wait"}],
                    "stream": stream,
                },
                headers={"Authorization": "Bearer carol-token"},
            )
        )
        request_id = await newest(services, "carol", LLAMA, seen)
        seen.add(request_id)
        assert (await services.get(request_id)).state == S.REQUEST_STATE_QUEUED
        call.cancel()  # the client hangs up while its request waits
        with contextlib.suppress(asyncio.CancelledError):
            await call
        ended = await services.wait_state(request_id, S.REQUEST_STATE_CANCELLED)
        assert ended.state == S.REQUEST_STATE_CANCELLED, ended
        assert "disconnected" in ended.error


async def test_a_client_that_leaves_mid_answer_cancels_its_request(
    http: httpx.AsyncClient, services: Services
) -> None:
    async with http.stream(
        "POST", "/api/generate", json={"model": GEMMA, "prompt": "a long story"}
    ) as reply:
        assert reply.status_code == 200
        request_id = reply.headers["X-Usher-Request-Id"]
        async for line in reply.aiter_lines():
            assert '"done":false' in line
            break
    # Leaving the block closed the connection mid-stream.
    ended = await services.wait_state(request_id, S.REQUEST_STATE_CANCELLED, timeout=10)
    assert ended.state == S.REQUEST_STATE_CANCELLED, ended
    assert "disconnected" in ended.error
    metrics = (await http.get("/metrics")).text
    assert "usher_gateway_disconnects_total" in metrics


async def test_a_client_that_leaves_while_its_answer_is_awaited_cancels_it(
    http: httpx.AsyncClient, services: Services
) -> None:
    """An answer sent whole of a request started at once is awaited in the Scheduler's
    Submit (``await_result``): a client leaving meanwhile still cancels it."""
    listed = await services.scheduler.List(
        scheduler_pb2.ListRequest(model=GEMMA, page_size=100), metadata=auth("carol"), timeout=5
    )
    seen = {request.id for request in listed.requests}
    for _ in range(3):  # one that started at once is what this is about
        call = asyncio.create_task(
            http.post(
                "/api/generate",
                json={"model": GEMMA, "prompt": "a long story", "stream": False},
                headers={"Authorization": "Bearer carol-token"},
            )
        )
        request_id = await newest(services, "carol", GEMMA, seen)
        seen.add(request_id)
        running = await services.wait_state(request_id, S.REQUEST_STATE_RUNNING)
        call.cancel()  # the client hangs up while the Submit waits for the end
        with contextlib.suppress(asyncio.CancelledError):
            await call
        ended = await services.wait_state(request_id, S.REQUEST_STATE_CANCELLED, timeout=10)
        assert ended.state == S.REQUEST_STATE_CANCELLED, ended
        assert "disconnected" in ended.error
        if running.attempts == 1 and running.state == S.REQUEST_STATE_RUNNING:
            return


# Only the trio: in one process the Notifier cannot restart apart from the gateway.
@pytest.mark.parametrize("stack", ["trio"], indirect=True)
async def test_a_stream_survives_a_notifier_restart(
    stack: LocalStack, http: httpx.AsyncClient, services: Services
) -> None:
    lines: list[dict[str, object]] = []
    async with http.stream(
        "POST",
        "/api/chat",
        json={
            "model": GEMMA,
            "messages": [{"role": "user", "content": "go"}],
            "options": {"num_predict": 12},  # 3 s at this fleet's speed
        },
    ) as reply:
        request_id = reply.headers["X-Usher-Request-Id"]
        async for line in reply.aiter_lines():
            lines.append(json.loads(line))
            if len(lines) == 1:
                stack.notifiers[0].kill()  # the status stream breaks mid-answer
                stack.start_notifier(0)
    final = lines[-1]
    assert final["done"] is True, final
    text = "".join(str(cast(dict[str, str], line["message"])["content"]) for line in lines)
    stored = await services.get(request_id)
    assert stored.state == S.REQUEST_STATE_COMPLETED
    assert text == stored.result.text  # nothing lost, nothing twice
