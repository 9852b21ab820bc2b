"""Waiting over HTTP, against the whole stack: a request's status as Server-Sent Events and
over a WebSocket (resumed without duplicates), the badges, cancel and switch; who may
watch what (owner or admin; a watch token opens its one request only); and compatible
streams that stay alive while queued (the official ``openai`` and ``ollama`` clients)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import ollama
import openai
import pytest

from tests.gateway.conftest import WAITING_MODELS, Ahead, Services, one_slot_stack
from usher.testing.sse import SseEvent, sse_events
from usher.testing.stack import LocalStack
from usher.v1 import request_pb2

pytestmark = pytest.mark.slow
MODEL = WAITING_MODELS[0]
S = request_pb2
ALICE = {"Authorization": "Bearer alice-token"}
BOB = {"Authorization": "Bearer bob-token"}


@pytest.fixture(scope="module", params=["trio", "serve"])
def stack(request: pytest.FixtureRequest) -> Iterator[LocalStack]:
    # About 2 s per answer.
    yield from one_slot_stack(
        tokens_per_second="10",
        output_tokens="16:24",
        keepalive="0.3",
        all_in_one=request.param == "serve",
    )


@pytest.fixture
async def session(stack: LocalStack) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        base_url=stack.gateway_url, timeout=aiohttp.ClientTimeout(total=60)
    ) as client:
        yield client


@pytest.fixture
async def busy(services: Services) -> AsyncIterator[Ahead]:
    # HIGH: a slot that frees between bob's Submits and the test's own must not let the
    # test's request (alice's, fairer by usage) start before bob's.
    ahead = Ahead(services, S.PRIORITY_HIGH)
    yield ahead
    await ahead.release()


async def submit(
    session: aiohttp.ClientSession, content: str, headers: dict[str, str] = ALICE, **extra: Any
) -> tuple[dict[str, Any], aiohttp.ClientResponse]:
    async with session.post(
        "/queue/requests",
        json={"model": MODEL, "messages": [{"role": "user", "content": content}], **extra},
        headers=headers,
    ) as reply:
        assert reply.status == 202, await reply.text()
        return await reply.json(), reply


async def read_until(response: aiohttp.ClientResponse, stop: Any, into: list[SseEvent]) -> None:
    async for event in sse_events(response):
        into.append(event)
        if stop(event):
            return


def data_events(events: list[SseEvent]) -> list[dict[str, Any]]:
    return [e.json() for e in events if e.event == "message"]


async def test_sse_carries_position_progress_and_resumes_without_duplicates(
    session: aiohttp.ClientSession, services: Services, busy: Ahead
) -> None:
    await busy.add(2)
    body, reply = await submit(session, "tell me a story")
    request_id = body["id"]
    assert body["state"] == "queued" and body["position"] >= 1
    assert body["message"].startswith(f"You are #{body['position']} of ")
    assert "Estimated wait:" in body["message"]
    token = reply.headers["X-Usher-Watch-Token"] == body["watch_token"] and body["watch_token"]
    assert token

    # An EventSource's way in: the watch token, no Authorization header.
    first: list[SseEvent] = []
    async with session.get(
        f"/queue/requests/{request_id}/events", params={"watch_token": token}
    ) as stream:
        assert stream.status == 200
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        await read_until(stream, lambda e: e.event == "message" and e.json()["text"], first)
    updates = data_events(first)
    assert updates[0]["kind"] == "snapshot" and updates[0]["state"] == "queued"
    positions = [u["position"] for u in updates if u["state"] == "queued" and "position" in u]
    assert positions == sorted(positions, reverse=True) and positions[-1] == 1, positions
    assert any(u["kind"] == "running" for u in updates)
    last_id = [e.id for e in first if e.id][-1]

    # Reconnect with Last-Event-ID: only what came after it.
    second: list[SseEvent] = []
    async with session.get(
        f"/queue/requests/{request_id}/events",
        params={"watch_token": token},
        headers={"Last-Event-ID": last_id},
    ) as stream:
        await read_until(stream, lambda e: e.event == "end", second)
    assert second[-1].event == "end" and second[-1].json() == {}
    ids = [e.id for e in first + second if e.id]
    assert len(ids) == len(set(ids)), "an event was delivered twice"
    done = data_events(second)[-1]
    assert done["kind"] == "completed" and done["state"] == "completed"
    assert done["message"].startswith("Your response is ready! Processing took")
    text = "".join(u["text"] for u in data_events(first) + data_events(second))
    stored = await services.get(request_id)
    assert text == stored.result.text == done["result"]["text"]


async def test_websocket_resumes_without_duplicates(
    session: aiohttp.ClientSession, services: Services
) -> None:
    body, _ = await submit(session, "over a socket")
    request_id = body["id"]
    first: list[dict[str, Any]] = []
    async with session.ws_connect(f"/queue/requests/{request_id}/ws", headers=ALICE) as ws:
        async for message in ws:
            update = json.loads(message.data)
            first.append(update)
            if update.get("text"):
                break
    last_id = [u["event_id"] for u in first if u.get("event_id")][-1]
    second: list[dict[str, Any]] = []
    async with session.ws_connect(
        f"/queue/requests/{request_id}/ws",
        params={"last_event_id": last_id, "watch_token": body["watch_token"]},
    ) as ws:
        async for message in ws:
            second.append(json.loads(message.data))
    assert second[-1] == {"kind": "end"}
    ids = [u["event_id"] for u in first + second if u.get("event_id")]
    assert len(ids) == len(set(ids))
    text = "".join(u.get("text", "") for u in first + second)
    assert text == (await services.get(request_id)).result.text


async def test_another_tenant_cannot_watch_cancel_or_get_a_token(
    session: aiohttp.ClientSession, busy: Ahead
) -> None:
    await busy.add(1)
    body, _ = await submit(session, "mine alone")
    path = f"/queue/requests/{body['id']}"
    for method, url in (
        ("GET", path),
        ("GET", path + "/events"),
        ("DELETE", path),
        ("POST", path + "/switch"),
    ):
        async with session.request(method, url, headers=BOB) as reply:
            assert reply.status in (403, 404), (method, url, reply.status)
    async with session.post(
        "/queue/watch-tokens", json={"request_id": body["id"]}, headers=BOB
    ) as reply:
        assert reply.status in (403, 404)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        async with session.ws_connect(path + "/ws", headers=BOB):
            pass
    assert refused.value.status in (403, 404)
    # No credential at all (no default token on this gateway): 401.
    async with session.get(path + "/events") as reply:
        assert reply.status == 401
    # An admin may watch anyone's request.
    async with session.get(path + "/events", headers={"Authorization": "Bearer admin-token"}) as r:
        assert r.status == 200
        async for event in sse_events(r):
            assert event.json()["id"] == body["id"]
            break


async def test_a_watch_token_opens_its_own_request_only(session: aiohttp.ClientSession) -> None:
    mine, _ = await submit(session, "first")
    other, _ = await submit(session, "second")
    for params in ({"watch_token": mine["watch_token"]}, {"watch_token": "forged.token"}):
        async with session.get(f"/queue/requests/{other['id']}/events", params=params) as reply:
            assert reply.status == 401
            assert "watch token" in (await reply.json())["error"]
    # The cookie set with the token is scoped to its request's path, and checked all the same.
    cookie = {"Cookie": f"usher_watch={mine['watch_token']}"}
    async with session.get(f"/queue/requests/{other['id']}/events", headers=cookie) as reply:
        assert reply.status == 401
    async with session.get(f"/queue/requests/{mine['id']}/events", headers=cookie) as reply:
        assert reply.status == 200
    # A watch token never acts: cancelling needs the caller's own credential.
    async with session.delete(
        f"/queue/requests/{mine['id']}", params={"watch_token": mine["watch_token"]}
    ) as reply:
        assert reply.status == 401


async def test_the_submit_sets_a_path_scoped_http_only_cookie(
    session: aiohttp.ClientSession,
) -> None:
    _, reply = await submit(session, "cookie please")
    cookie = reply.cookies["usher_watch"]
    assert cookie["path"].startswith("/queue/requests/")
    assert cookie["httponly"] and cookie["samesite"] == "Strict"


async def test_cancel_ends_the_stream_with_the_cancelled_update(
    session: aiohttp.ClientSession, busy: Ahead
) -> None:
    await busy.add(2)
    body, _ = await submit(session, "never mind")
    events: list[SseEvent] = []
    async with session.get(
        f"/queue/requests/{body['id']}/events", params={"watch_token": body["watch_token"]}
    ) as stream:
        async for event in sse_events(stream):
            events.append(event)
            if event.event == "message" and event.json()["kind"] == "snapshot":
                async with session.delete(f"/queue/requests/{body['id']}", headers=ALICE) as r:
                    assert r.status == 200 and (await r.json())["state"] == "cancelled"
            if event.event == "end":
                break
    updates = data_events(events)
    assert updates[-1]["kind"] == "cancelled"
    assert updates[-1]["message"].startswith("Your request was cancelled")
    async with session.delete(f"/queue/requests/{body['id']}", headers=ALICE) as again:
        assert again.status == 409


async def test_switch_moves_a_queued_request_to_the_external_provider(
    session: aiohttp.ClientSession, services: Services, busy: Ahead
) -> None:
    await busy.add(3)
    body, _ = await submit(session, "I am in a hurry")
    assert body["switch_offered"] is True
    async with session.post(f"/queue/requests/{body['id']}/switch", headers=ALICE) as reply:
        assert reply.status == 200, await reply.text()
        switched = await reply.json()
    assert switched["route"] == "external" and switched["switch_offered"] is False
    done = await services.wait_state(body["id"], S.REQUEST_STATE_COMPLETED, timeout=20)
    assert done.state == S.REQUEST_STATE_COMPLETED and done.route == S.ROUTE_EXTERNAL
    local_only, _ = await submit(
        session, "stay here", headers={**ALICE, "X-Usher-Fallback": "local_only"}
    )
    assert local_only["switch_offered"] is False


async def test_badges_over_sse_and_websocket(session: aiohttp.ClientSession, busy: Ahead) -> None:
    # With a token of the caller's own, or a badge watch token (what the page uses).
    async with session.post("/queue/watch-tokens", json={}, headers=ALICE) as reply:
        assert reply.status == 200
        issued = await reply.json()
        assert issued["scope"] == "queues"
        assert reply.cookies["usher_watch"]["path"] == "/queue/models"
    async with session.get(
        "/queue/models/events", params={"model": MODEL, "watch_token": issued["watch_token"]}
    ) as stream:
        assert stream.status == 200
        levels: list[str] = []
        grown = False
        async with asyncio.timeout(60):
            async for event in sse_events(stream):
                if event.event != "message":
                    continue
                (badge,) = event.json()["badges"]
                assert badge["model"] == MODEL and badge["label"].startswith(MODEL)
                levels.append(badge["level"])
                if not grown:
                    # Once the queue is short (an earlier test's requests may still be
                    # leaving it on a busy machine), it grows past "long".
                    if badge["level"] != "long":
                        grown = True
                        await busy.add(7)
                elif badge["level"] == "long":
                    assert badge["suggestion"].startswith("Consider ")
                    break
    assert grown and levels[-1] == "long", levels
    async with session.ws_connect("/queue/models/ws", headers=ALICE) as ws:
        message = await ws.receive_json(timeout=10)
        assert {b["model"] for b in message["badges"]} >= {MODEL}
    async with session.get("/queue/models/events") as reply:
        assert reply.status == 401


async def test_openai_stream_sends_headers_and_comments_while_queued(
    stack: LocalStack, session: aiohttp.ClientSession, services: Services, busy: Ahead
) -> None:
    await busy.add(2)
    comments: list[str] = []
    async with session.post(
        "/v1/chat/completions",
        json={"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
        headers=ALICE,
    ) as stream:
        # Headers come while the request still waits behind bob's (long before its end).
        assert stream.status == 200
        assert stream.headers["X-Usher-Request-Id"] and stream.headers["X-Usher-Watch-Token"]
        waiting = await services.get(stream.headers["X-Usher-Request-Id"])
        assert waiting.state in (S.REQUEST_STATE_QUEUED, S.REQUEST_STATE_RUNNING)
        chunks: list[dict[str, Any]] = []
        async for event in sse_events(stream):
            if event.event == "comment":
                comments.append(event.data)
                if len(comments) == 1:
                    await busy.release()  # seen waiting: no need to wait out bob's answers
            elif event.data == "[DONE]":
                break
            else:
                chunks.append(event.json())
    assert any(c.startswith("queued ") and " of " in c and "about" in c for c in comments), comments
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    # The official client ignores the comments (sent while it waits, until bob's go).
    await busy.add(2)
    client = openai.AsyncOpenAI(base_url=stack.gateway_url + "/v1", api_key="alice-token")
    release = asyncio.get_running_loop().call_later(
        1.0, lambda: asyncio.ensure_future(busy.release())
    )
    try:
        streamed = await client.chat.completions.create(
            model=MODEL, stream=True, messages=[{"role": "user", "content": "hello"}]
        )
        text = "".join([c.choices[0].delta.content or "" async for c in streamed if c.choices])
    finally:
        release.cancel()
    assert text


async def test_ollama_stream_sends_headers_at_once_and_errors_in_stream(
    stack: LocalStack, session: aiohttp.ClientSession, services: Services, busy: Ahead
) -> None:
    await busy.add(2)
    async with session.post(
        "/api/generate",
        json={"model": MODEL, "prompt": "in a hurry"},
        headers={**ALICE, "X-Usher-Queue-Timeout": "0.5"},
    ) as stream:
        # 200, then the timeout as the stream's last line: the headers went out while the
        # request waited (sent when it left the queue, they'd have been a 504).
        assert stream.status == 200
        request_id = stream.headers["X-Usher-Request-Id"]
        lines = [json.loads(line) async for line in stream.content if line.strip()]
    assert lines[-1].get("code") == "timeout" and lines[-1]["error"], lines[-3:]
    expired = await services.get(request_id)
    assert expired.state == S.REQUEST_STATE_EXPIRED
    # The official client raises the error line as Ollama's own would.
    hurried = ollama.AsyncClient(
        host=stack.gateway_url, headers={**ALICE, "X-Usher-Queue-Timeout": "0.5"}
    )
    with pytest.raises(ollama.ResponseError, match=r"timed out|expired|queue"):
        async for _ in await hurried.generate(model=MODEL, prompt="again", stream=True):
            pass
    # Without a queue timeout the client streams its answer.
    await busy.release()
    client = ollama.AsyncClient(host=stack.gateway_url, headers=ALICE)
    parts = [
        p.response or ""
        async for p in await client.generate(model=MODEL, prompt="now", stream=True)
    ]
    assert "".join(parts)


async def test_bad_input_is_refused_naming_the_field(session: aiohttp.ClientSession) -> None:
    async def refused(method: str, url: str, field: str, status: int = 400, **kw: Any) -> None:
        async with session.request(method, url, headers=ALICE, **kw) as reply:
            body = await reply.json()
            assert reply.status == status, (url, body)
            assert body.get("field") == field, (url, body)

    await refused("GET", "/queue/requests/not-an-id", "id")
    await refused("GET", "/queue/requests/not-an-id/events", "id")
    await refused("DELETE", "/queue/requests/not-an-id", "id")
    await refused("POST", "/queue/requests", "body", data=b"{not json")
    await refused(
        "POST",
        "/queue/requests",
        "model",
        404,
        json={"model": "nope:1b", "messages": [{"role": "user", "content": "x"}]},
    )
    await refused("POST", "/queue/requests", "messages", json={"model": MODEL})
    await refused("POST", "/queue/watch-tokens", "request_id", json={"request_id": 7})
    body, _ = await submit(session, "resume me")
    await refused(
        "GET",
        f"/queue/requests/{body['id']}/events",
        "last_event_id",
        params={"last_event_id": "x"},
    )
    async with session.post(
        "/admin/queue/pause", json={"paused": True}, headers={"Authorization": "Bearer admin-token"}
    ) as reply:
        assert reply.status == 400 and (await reply.json())["field"] == "model"
    async with session.post("/admin/queue/pause", json={"model": MODEL}, headers=ALICE) as reply:
        assert reply.status == 403
    async with session.get("/admin/overview", headers=ALICE) as reply:
        assert reply.status == 403
    async with session.get(
        "/queue/models/events",
        params={"model": ",".join(f"m{i}" for i in range(101))},
        headers=ALICE,
    ) as reply:
        assert reply.status == 400


async def test_another_sites_page_is_refused(
    stack: LocalStack, session: aiohttp.ClientSession
) -> None:
    """What a page elsewhere makes a browser send (with a default token or in open mode no
    credential would stop it) is refused; the gateway's own page is not."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "from elsewhere"}]}
    evil = {**ALICE, "Origin": "http://evil.example"}
    async with session.post("/queue/requests", json=body, headers=evil) as reply:
        assert reply.status == 403
    async with session.post("/queue/watch-tokens", json={}, headers=evil) as reply:
        assert reply.status == 403
    own = {**ALICE, "Origin": stack.gateway_url}
    async with session.post("/queue/requests", json=body, headers=own) as reply:
        assert reply.status == 202


# Only the trio: in one process the Notifier cannot restart apart from the gateway.
@pytest.mark.parametrize("stack", ["trio"], indirect=True)
async def test_a_status_stream_survives_a_notifier_restart(
    stack: LocalStack, session: aiohttp.ClientSession, services: Services
) -> None:
    """The gateway resumes its Notifier watch after the last event it passed on: the
    browser's stream goes on, nothing lost, nothing twice."""
    body, _ = await submit(session, "keep going", max_tokens=40)
    events: list[SseEvent] = []
    restarted = False
    async with session.get(
        f"/queue/requests/{body['id']}/events", params={"watch_token": body["watch_token"]}
    ) as stream:
        async for event in sse_events(stream):
            events.append(event)
            if not restarted and event.event == "message" and event.json()["text"]:
                stack.notifiers[0].kill()  # mid-answer: the gateway's watch breaks
                stack.start_notifier(0)
                restarted = True
            if event.event == "end":
                break
    assert restarted
    assert events[-1].event == "end" and events[-1].json() == {}, events[-1]
    ids = [e.id for e in events if e.id]
    assert len(ids) == len(set(ids))
    text = "".join(u["text"] for u in data_events(events))
    assert text == (await services.get(body["id"])).result.text
