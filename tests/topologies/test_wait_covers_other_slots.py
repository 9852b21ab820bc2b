"""With WAIT on, on a real Redis Cluster: a Submit waits for a replica on every primary it
wrote to that a failover could cost it (the model's, the caller's listing's, and the model
set's and model names' when it wrote there), so Get, Watch, Cancel (by id alone: its
model's tag) and List still find an accepted request after a primary is lost, and the
dispatchers still walk its model's queue."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from services.scheduler.store import QueueStore
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


async def test_a_submit_waits_on_the_callers_listings_primary_too(
    sync: redis.RedisCluster, store: QueueStore
) -> None:
    model_node = node_of(sync, ModelKeys("m").queue)
    user = user_away_from(sync, model_node)
    listing_node = node_of(sync, keys.tenant_requests(f"acme/{user}"))
    await store.submit(new_request(model="m", user=user))  # the model set written
    before = waits_by_node(sync)
    assert (await store.submit(new_request(model="m", user=user))).status == "queued"
    assert waits_by_node(sync)[listing_node] > before[listing_node]


async def test_a_models_first_submit_waits_on_the_model_sets_and_names_primaries_too(
    sync: redis.RedisCluster, store: QueueStore
) -> None:
    """The model set decides which queues the dispatchers walk, the model names which models
    a lookup by id alone asks: either entry lost in a failover, a request accepted for a new
    model would wait for the model's next Submit, or not be found by its id alone."""
    for key in (keys.MODELS, keys.MODEL_NAMES):
        node = node_of(sync, key)
        model = next(
            f"m{n}{key[-5:]}"
            for n in range(100)
            if node_of(sync, ModelKeys(f"m{n}{key[-5:]}").queue) != node
        )
        user = user_away_from(sync, node)
        before = waits_by_node(sync)
        assert (await store.submit(new_request(model=model, user=user))).status == "queued"
        first = waits_by_node(sync)
        assert first[node] > before[node]
        assert sync.sismember(key, model)
        # Its next Submits leave them alone (written moments ago): no WAIT there.
        assert (await store.submit(new_request(model=model, user=user))).status == "queued"
        assert waits_by_node(sync)[node] == first[node]
