from __future__ import annotations

import asyncio
import time

from services.scheduler.store import FinishedWork, Lease, QueueStore
from tests.scheduler.factories import new_request
from usher.keys import ModelKeys
from usher.queue.reads import AVERAGES_CACHE_SECONDS
from usher.v1 import request_pb2


async def test_submit_claim_finish(store: QueueStore) -> None:
    req = new_request()
    outcome = await store.submit(req)
    assert outcome.status == "queued"
    assert (outcome.position, outcome.queue_length) == (1, 1)
    got = await store.get(req.id)
    assert got is not None and got.state == request_pb2.REQUEST_STATE_QUEUED
    assert got.position == 1
    lease = await store.claim("llama3.2", "test")
    assert lease is not None and lease.request.id == req.id
    assert await store.finish(
        lease,
        FinishedWork(
            state=request_pb2.REQUEST_STATE_COMPLETED,
            actual_tokens=150,
            service_ms=1000,
            output_tokens=50,
            tokens_per_second=50,
        ),
    )
    got = await store.get(req.id)
    assert got is not None and got.state == request_pb2.REQUEST_STATE_COMPLETED


async def test_a_pause_holds_claims_whichever_hash_says_it(store: QueueStore) -> None:
    """claim.lua reads the paused flag's copy in the fairness hash; a model whose copy is
    missing (queued before it existed) is held by its config's flag."""
    mk = ModelKeys("llama3.2")
    await store.submit(new_request())
    await store.set_paused("llama3.2", True)
    assert await store.claim("llama3.2", "test") is None
    await store.set_paused("llama3.2", False)
    await store.redis.hset(mk.config, "paused", 1)  # written without its copy
    await store.redis.hdel(mk.fairness, "paused")
    assert await store.claim("llama3.2", "test") is None
    await store.redis.hset(mk.config, "paused", 0)
    lease = await store.claim("llama3.2", "test")
    assert lease is not None and lease.event_id  # the claim names the event it wrote


async def test_enqueue_reads_the_config_from_its_copies_and_makes_them_when_missing(
    store: QueueStore,
) -> None:
    """enqueue.lua reads the config's copies in the fairness hash (no read of the config
    itself); a model whose copies are missing (configured before they existed) has its
    config read and copied, and every change through update_config reaches the copies."""
    mk = ModelKeys("llama3.2")
    await store.redis.hset(mk.config, mapping={"max_queue_size": 2, "max_attempts": 5})
    first = await store.submit(new_request())  # no copies yet: the config is read
    assert first.status == "queued" and first.request is not None
    assert first.request.max_attempts == 5
    copies = await store.redis.hmget(
        mk.fairness, ["config", "config:max_queue_size", "config:max_attempts"]
    )
    assert copies == [b"2", b"2", b"5"]
    await store.update_config("llama3.2", {"max_queue_size": 1, "queue_timeout_ms": 9000})
    assert (await store.submit(new_request())).status == "full"
    await store.update_config("llama3.2", {"max_queue_size": 3})
    second = await store.submit(new_request())
    assert second.request is not None and second.request.queue_timeout_ms == 9000
    await store.set_paused("llama3.2", True)
    assert (await store.submit(new_request())).status == "queued"
    assert await store.claim("llama3.2", "test") is None  # paused, its copy kept


async def test_a_models_lease_is_the_one_its_claims_take_and_its_heartbeats_renew(
    store: QueueStore,
) -> None:
    """A model's lease (UpdateQueueConfig's lease_duration) is what its claims take from
    then on, claim.lua's and the claim riding an enqueue alike, and what heartbeats renew;
    a model without one takes the default. Copies made before the lease was copied (their
    version '1') are made again, so a lease set then acts too."""
    mk = ModelKeys("llama3.2")
    await store.submit(new_request())
    lease = await store.claim("llama3.2", "test")
    assert lease is not None and lease.lease_ms == store.defaults.lease_ms == 30_000

    await store.update_config("llama3.2", {"lease_ms": 2000})
    await store.submit(new_request())
    leases = [await store.claim("llama3.2", "test")]  # by claim.lua
    # Riding an enqueue to an empty queue (the request written running at once), then to a
    # queue holding one (the claim takes that one).
    leases.append((await store.submit(new_request(), claim_for="test")).claimed)  # type: ignore[arg-type]
    await store.submit(new_request())
    leases.append((await store.submit(new_request(), claim_for="test")).claimed)  # type: ignore[arg-type]
    for lease in leases:
        assert isinstance(lease, Lease) and lease.lease_ms == 2000
        await _assert_lease_ends_within(store, lease.request.id, 2000)
    await asyncio.sleep(0.05)
    assert isinstance(lease, Lease) and await store.heartbeat(lease) == 0
    await _assert_lease_ends_within(store, lease.request.id, 2000)

    # A lease set in the config while the copies were of version '1' (without it).
    await store.redis.hset(mk.config, "lease_ms", 3000)
    await store.redis.hset(mk.fairness, "config", "1")
    await store.redis.hdel(mk.fairness, "config:lease_ms")
    await store.submit(new_request())
    lease = await store.claim("llama3.2", "test")
    assert lease is not None and lease.lease_ms == 3000


async def _assert_lease_ends_within(store: QueueStore, request_id: str, lease_ms: int) -> None:
    ends = await store.redis.zscore(ModelKeys("llama3.2").leases, request_id)
    now_ms = time.time() * 1000
    assert ends is not None and now_ms + lease_ms - 500 <= ends <= now_ms + lease_ms


async def test_completion_figures_move_from_the_stats_hash_and_add_up(store: QueueStore) -> None:
    """complete.lua keeps the completion's counters and averages in the fairness hash; a
    model whose figures are still in its stats hash (the layout before) goes on from them,
    and its counters are the sum of both."""
    mk = ModelKeys("llama3.2")
    await store.redis.hset(
        mk.stats, mapping={"completed": 7, "expired": 2, "service_ms": 1000, "service_n": 50}
    )
    await store.submit(new_request())
    lease = await store.claim("llama3.2", "test")
    assert lease is not None
    work = FinishedWork(state=request_pb2.REQUEST_STATE_COMPLETED, service_ms=2000)
    assert await store.finish(lease, work) is not None
    counters = await store.counters("llama3.2")
    assert (counters["completed"], counters["expired"], counters["service_n"]) == (8, 2, 51)
    assert 1000 < counters["service_ms"] < 2000  # the old mean moved by one sample
    await asyncio.sleep(AVERAGES_CACHE_SECONDS)  # read afresh
    averages, _ = await store.model_averages("llama3.2")
    assert averages.service_seconds == counters["service_ms"] / 1000
    await store.reset_counters("llama3.2")
    assert "completed" not in await store.counters("llama3.2")
