"""Started notes and tokens reach the request's stream batched, in order, and on time."""

from __future__ import annotations

import asyncio
from typing import cast

import redis.asyncio as aioredis

from services.scheduler.progress import ProgressBuffer, ProgressWriter
from services.scheduler.store import FinishedWork, Lease, QueueStore
from tests.scheduler.factories import new_request
from usher.keys import ModelKeys
from usher.v1 import request_pb2


async def _types(redis_client: aioredis.Redis, model: str, request_id: str) -> list[str]:
    events = cast(
        list[tuple[bytes, dict[bytes, bytes]]],
        await redis_client.xrange(ModelKeys(model).request_events(request_id)),
    )
    return [fields[b"type"].decode() for _, fields in events]


async def _claimed(store: QueueStore) -> Lease:
    request = new_request()
    await store.submit(request)
    lease = await store.claim(request.model, "d")
    assert lease is not None
    return lease


async def _written(redis_client: aioredis.Redis, lease: Lease) -> list[str]:
    return await _types(redis_client, lease.request.model, lease.request.id)


async def test_the_first_token_goes_out_at_once_with_the_started_note(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    lease = await _claimed(store)
    buffer = ProgressBuffer(ProgressWriter(store), lease, interval=5.0)
    buffer.started("gpu-1", lease.request.model)
    await asyncio.sleep(0.1)
    assert "started" not in await _written(redis_client, lease)  # the note can wait
    buffer.tokens("Hel", 1)
    await asyncio.sleep(0.1)  # a token can't: out within a round trip, not an interval
    assert (await _written(redis_client, lease))[-2:] == ["started", "tokens"]
    buffer.tokens("lo", 2)  # within the interval: held, and handed to the completion
    pending = await buffer.close()
    assert pending == [("tokens", {"text": "lo", "tokens": 2})]
    assert await store.finish(
        lease, FinishedWork(state=request_pb2.REQUEST_STATE_COMPLETED), pending
    )
    assert (await _written(redis_client, lease))[-4:] == [
        "started",
        "tokens",
        "tokens",
        "completed",
    ]


async def test_a_short_answer_costs_one_write_with_its_completion(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    lease = await _claimed(store)
    buffer = ProgressBuffer(ProgressWriter(store), lease, interval=5.0)
    buffer.started("gpu-1", lease.request.model)
    pending = await buffer.close()  # the answer was done before the note was due
    assert [kind for kind, _ in pending] == ["started"]
    assert await store.finish(
        lease, FinishedWork(state=request_pb2.REQUEST_STATE_COMPLETED), pending
    )
    assert (await _written(redis_client, lease))[-2:] == ["started", "completed"]


async def test_tokens_within_the_interval_follow_when_it_is_up(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    lease = await _claimed(store)
    buffer = ProgressBuffer(ProgressWriter(store), lease, interval=0.05)
    buffer.tokens("first", 1)
    await asyncio.sleep(0.01)  # written at once
    buffer.tokens(" second", 2)  # within the interval: waits for it
    await asyncio.sleep(0.3)  # the model server goes quiet: what it said is out anyway
    assert (await _written(redis_client, lease))[-2:] == ["tokens", "tokens"]
    assert await buffer.close() == []


async def test_writes_of_many_requests_go_together_each_to_its_own_stream(
    store: QueueStore, redis_client: aioredis.Redis
) -> None:
    leases = [await _claimed(store) for _ in range(5)]
    lost = leases[2]
    await store.requeue(lost, "taken back", count_attempt=False)  # its lease is gone
    writer = ProgressWriter(store)
    written = [
        writer.write(lease, [("tokens", {"text": f"t{i}", "tokens": 1})])
        for i, lease in enumerate(leases)
    ]
    assert await asyncio.gather(*written) == [True, True, False, True, True]
    for lease in leases:
        types = await _written(redis_client, lease)
        assert ("tokens" in types) is (lease is not lost)
