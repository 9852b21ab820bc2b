"""Started notes and tokens reach the request's stream batched, in order, and on time."""

from __future__ import annotations

import asyncio
from typing import cast

import redis.asyncio as aioredis

from services.scheduler.dispatcher import ProgressBuffer
from services.scheduler.store import FinishedWork, QueueStore
from tests.scheduler.factories import new_request
from usher.keys import ModelKeys
from usher.v1 import request_pb2


async def _types(redis_client: aioredis.Redis, model: str, request_id: str) -> list[str]:
    events = cast(
        list[tuple[bytes, dict[bytes, bytes]]],
        await redis_client.xrange(ModelKeys(model).request_events(request_id)),
    )
    return [fields[b"type"].decode() for _, fields in events]


async def test_a_short_answer_lands_with_its_completion(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    request = new_request()
    await store.submit(request)
    lease = await store.claim(request.model, "d")
    assert lease is not None
    buffer = ProgressBuffer(store, lease, interval=5.0)
    buffer.started("gpu-1", request.model)
    buffer.tokens("Hel", 1)
    buffer.tokens("lo", 2)
    pending = await buffer.close()
    assert [kind for kind, _ in pending] == ["started", "tokens"]
    assert pending[1][1] == {"text": "Hello", "tokens": 2}
    assert await store.finish(
        lease, FinishedWork(state=request_pb2.REQUEST_STATE_COMPLETED), pending
    )
    types = await _types(redis_client, request.model, request.id)
    assert types[-3:] == ["started", "tokens", "completed"]


async def test_a_stalled_stream_still_flushes_after_the_interval(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    request = new_request()
    await store.submit(request)
    lease = await store.claim(request.model, "d")
    assert lease is not None
    buffer = ProgressBuffer(store, lease, interval=0.05)
    buffer.started("gpu-1", request.model)
    buffer.tokens("first", 1)
    await asyncio.sleep(0.3)  # the model server goes quiet: what it said is out anyway
    assert (await _types(redis_client, request.model, request.id))[-2:] == ["started", "tokens"]
    buffer.tokens(" second", 2)
    assert await buffer.close() == [("tokens", {"text": " second", "tokens": 2})]
