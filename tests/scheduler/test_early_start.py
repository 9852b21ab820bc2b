"""The early start (``Dispatcher._start_early``) on real servers: the Pool (gRPC, real Redis,
an emulated Ollama) and the Scheduler's store on a real Redis. A Submit that waits for the
end of a short, result-only answer, or whose answer is streamed, has its Generate sent on
the parked loop's slot beside its enqueue; it runs on only when the claim riding the
enqueue took that request."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from services.scheduler.dispatcher import Dispatcher, Expected, _EarlyStart, _Holding
from services.scheduler.store import Lease, SubmitOutcome
from tests.pool.test_pool_service import MODEL, slots_held
from tests.scheduler.factories import new_request
from tests.scheduler.on_a_pool import dispatcher_on_a_pool, reserve
from usher.queue.records import QUEUED
from usher.testing.redis_server import ExternalRedis, RedisServer
from usher.v1 import pool_pb2, request_pb2


async def parked_with_a_slot(loops: Dispatcher) -> tuple[pool_pb2.Slot, asyncio.Task[Lease | None]]:
    """A loop holding a slot of MODEL (reserved from the Pool), parked for the Submit
    expected next."""
    slot = await reserve(loops, MODEL)
    claim = asyncio.create_task(loops._claim(MODEL, False, _Holding(slot, False, False)))
    for _ in range(5):
        await asyncio.sleep(0)
    assert loops._parked.get(MODEL), "the loop waits for the Submit"
    return slot, claim


async def claimed_early(
    loops: Dispatcher, result_only: bool
) -> tuple[Expected, SubmitOutcome, pool_pb2.Slot, Lease, _EarlyStart]:
    """A Submit (awaiting its end when ``result_only``, else streamed) enqueued beside a
    parked loop's claim that took it, its Generate started early."""
    expected = await loops.expect(MODEL)
    slot, claim = await parked_with_a_slot(loops)
    request = new_request(model=MODEL, result_only=result_only)
    outcome = await expected.enqueue(request, await_end=result_only)
    lease = await claim
    assert lease is not None and lease.request.id == outcome.request_id
    return expected, outcome, slot, lease, loops._early[lease.request.id]


async def no_slot_held(loops: Dispatcher, slot: pool_pb2.Slot, redis: aioredis.Redis) -> None:
    """The loop lets its slot go (the Pool let it go already with the early call): none is
    held."""
    await loops._release(slot)
    for _ in range(100):
        if await slots_held(redis) == 0:
            break
        await asyncio.sleep(0.02)
    assert await slots_held(redis) == 0


async def test_a_request_started_early_runs_on_when_its_claim_took_it(
    redis_server: RedisServer | ExternalRedis, redis_client: aioredis.Redis
) -> None:
    async with dispatcher_on_a_pool(
        redis_server.url, redis_client, time_to_first_token=0.2
    ) as loops:
        expected, outcome, slot, lease, early = await claimed_early(loops, result_only=True)
        assert isinstance(early.call, asyncio.Future)
        assert not early.call.done()  # the model server works through the round trip
        assert await loops.run_request(lease, slot) is not None
        assert expected.ended is not None
        end = await expected.ended
        assert end is not None and end.state == request_pb2.REQUEST_STATE_COMPLETED
        assert end.result and not loops._early
        stored = await loops.store.inspect(MODEL, outcome.request_id)
        assert stored is not None and stored.state == request_pb2.REQUEST_STATE_COMPLETED


@pytest.mark.parametrize("result_only", [True, False], ids=["whole", "streamed"])
async def test_an_early_start_the_claim_did_not_take_is_stopped_and_nothing_is_lost(
    redis_server: RedisServer | ExternalRedis, redis_client: aioredis.Redis, result_only: bool
) -> None:
    """An older request queued through another replica (this one believes nothing queued):
    the claim riding the enqueue takes that one, so the early start is cancelled (a
    streamed one's first message unread), its slot goes, and the older request goes back
    to its place. Both wait for a loop; none is lost, no slot stays held, and the new
    request has no output written."""
    async with dispatcher_on_a_pool(
        redis_server.url, redis_client, time_to_first_token=0.1
    ) as loops:
        store = loops.store
        older = await store.submit(new_request(model=MODEL))
        expected = await loops.expect(MODEL)
        slot, claim = await parked_with_a_slot(loops)
        request = new_request(model=MODEL, result_only=result_only)
        outcome = await expected.enqueue(request, await_end=result_only)
        assert outcome.started is None and expected.ended is None
        assert await claim is None  # its slot went with the early start
        assert not loops._early
        await no_slot_held(loops, slot, redis_client)
        await loops._background.drain()  # the older request's way back
        await asyncio.sleep(0.2)  # past the model server's first token, had it been read
        for request_id in (older.request_id, outcome.request_id):
            stored = await store.inspect(MODEL, request_id)
            assert stored is not None and stored.state == QUEUED, request_id
        watched = await store.open_watch(MODEL, outcome.request_id, "0-0")
        assert watched is not None
        assert [f for _, f in watched.events if f.get("type") == "tokens"] == []
        again = await store.claim(MODEL, "elsewhere")
        assert again is not None and again.request.id == older.request_id  # its place kept


async def test_no_early_start_while_another_submit_of_the_model_is_on_its_way(
    redis_server: RedisServer | ExternalRedis, redis_client: aioredis.Redis
) -> None:
    """Enqueues racing each other make a queue whose fair head may be the other's: the
    claim would likely not take this request, so its Generate waits for the claim."""
    async with dispatcher_on_a_pool(redis_server.url, redis_client) as loops:
        expected = await loops.expect(MODEL)
        other = await loops.expect(MODEL)
        slot, claim = await parked_with_a_slot(loops)
        outcome = await expected.enqueue(new_request(model=MODEL, result_only=True), await_end=True)
        lease = await claim
        assert lease is not None and lease.request.id == outcome.request_id
        assert not loops._early  # claimed beside the enqueue, started after it
        other.end()
        assert await loops.run_request(lease, slot) is not None
        assert expected.ended is not None and (await expected.ended) is not None


async def test_a_streamed_answer_started_early_streams_its_tokens_once_claimed(
    redis_server: RedisServer | ExternalRedis, redis_client: aioredis.Redis
) -> None:
    async with dispatcher_on_a_pool(
        redis_server.url, redis_client, time_to_first_token=0.2
    ) as loops:
        _, outcome, slot, lease, early = await claimed_early(loops, result_only=False)
        assert not early.whole  # streamed: its first message asked for, not yet come
        assert await loops.run_request(lease, slot) is not None
        assert not loops._early
        stored = await loops.store.inspect(MODEL, outcome.request_id)
        assert stored is not None and stored.state == request_pb2.REQUEST_STATE_COMPLETED
        watched = await loops.store.open_watch(MODEL, outcome.request_id, "0-0")
        assert watched is not None
        kinds = [fields.get("type") for _, fields in watched.events]
        assert "tokens" in kinds and kinds[-1] == "completed"
        text = "".join(f["text"] for _, f in watched.events if f.get("type") == "tokens")
        assert text and request_pb2.RequestResult.FromString(stored.result).text == text
