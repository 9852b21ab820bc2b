"""With WAIT on, on a real Redis Cluster: a Submit waits for a replica on every primary it
wrote to that a failover could cost it (the model's, its id index entry's, the caller's
listing's, and the model set's when it wrote there), so Get, Watch, Cancel and List still
find an accepted request after a primary is lost, and the dispatchers still walk its
model's queue."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from services.scheduler.store import NewRequest, QueueStore
from tests.scheduler.factories import new_request
from usher import keys
from usher.connections import connect_redis
from usher.keys import ModelKeys
from usher.queue.records import QueueDefaults
from usher.testing.redis_topologies import LocalRedisCluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRedisCluster]:
    with LocalRedisCluster() as running:
        yield running


@pytest.fixture
def sync(cluster: LocalRedisCluster) -> Iterator[redis.RedisCluster]:
    """A plain client of the cluster, to see where keys live and count WAITs per node."""
    client = redis.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
    yield client
    client.close()


@pytest.fixture
async def store(cluster: LocalRedisCluster) -> AsyncIterator[QueueStore]:
    """A store of its own (it adds a model to the model set at its first Submit) with WAIT."""
    queues = QueueStore(
        connect_redis(cluster.url), QueueDefaults(wait_replicas=1, wait_timeout_ms=2000)
    )
    yield queues
    await queues.redis.aclose()


def waits_by_node(client: redis.RedisCluster) -> dict[str, int]:
    stats = client.info("commandstats", target_nodes=client.PRIMARIES)
    return {
        node: int(per_node.get("cmdstat_wait", {}).get("calls", 0))
        for node, per_node in stats.items()
    }


def node_of(client: redis.RedisCluster, key: str) -> str:
    return str(client.get_node_from_key(key).name)  # type: ignore[no-untyped-call]


def user_away_from(client: redis.RedisCluster, *nodes: str) -> str:
    """A user of org acme whose listing lives on none of ``nodes``."""
    return next(
        f"u{n}"
        for n in range(1000)
        if node_of(client, keys.tenant_requests(f"acme/u{n}")) not in nodes
    )


def request_away_from(client: redis.RedisCluster, model: str, user: str, node: str) -> NewRequest:
    """A request whose id index entry does not live on ``node``."""
    request = new_request(model=model, user=user)
    while node_of(client, keys.request_index(request.id)) == node:
        request = new_request(model=model, user=user)
    return request


async def test_a_submit_waits_on_the_index_entrys_primary_too(
    sync: redis.RedisCluster, store: QueueStore
) -> None:
    # A request whose index entry lives on another primary than its model's queue.
    model_node = node_of(sync, ModelKeys("m").queue)
    request = request_away_from(sync, "m", "alice", model_node)
    index_node = node_of(sync, keys.request_index(request.id))
    before = waits_by_node(sync)
    outcome = await store.submit(request)
    after = waits_by_node(sync)
    assert outcome.status == "queued"
    assert after[model_node] > before[model_node]
    assert after[index_node] > before[index_node]


async def test_a_submit_waits_on_the_callers_listings_primary_too(
    sync: redis.RedisCluster, store: QueueStore
) -> None:
    model_node = node_of(sync, ModelKeys("m").queue)
    user = user_away_from(sync, model_node)
    listing_node = node_of(sync, keys.tenant_requests(f"acme/{user}"))
    await store.submit(new_request(model="m", user=user))  # the model set written
    before = waits_by_node(sync)
    request = request_away_from(sync, "m", user, listing_node)
    assert (await store.submit(request)).status == "queued"
    assert waits_by_node(sync)[listing_node] > before[listing_node]


async def test_a_models_first_submit_waits_on_the_model_sets_primary_too(
    sync: redis.RedisCluster, store: QueueStore
) -> None:
    """The model set decides which queues the dispatchers walk: its entry lost in a
    failover, a request accepted for a new model would wait for the model's next Submit."""
    models_node = node_of(sync, keys.MODELS)
    model = next(
        f"m{n}" for n in range(100) if node_of(sync, ModelKeys(f"m{n}").queue) != models_node
    )
    user = user_away_from(sync, models_node)
    before = waits_by_node(sync)
    assert (await store.submit(request_away_from(sync, model, user, models_node))).status == (
        "queued"
    )
    first = waits_by_node(sync)
    assert first[models_node] > before[models_node]
    assert sync.sismember(keys.MODELS, model)
    # Its next Submits leave the model set alone (written moments ago): no WAIT there.
    again = request_away_from(sync, model, user, models_node)
    assert (await store.submit(again)).status == "queued"
    assert waits_by_node(sync)[models_node] == first[models_node]
