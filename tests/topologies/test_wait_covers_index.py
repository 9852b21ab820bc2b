"""With WAIT on, on a real Redis Cluster: a Submit waits for a replica on every primary it
wrote to that a failover could cost it (the model's, its id index entry's, and the model
set's when it wrote there), so Get, Watch and Cancel still find an accepted request after
a primary is lost, and the dispatchers still walk its model's queue."""

from __future__ import annotations

import redis

from services.scheduler.store import QueueStore
from tests.scheduler.factories import new_request
from usher import keys
from usher.connections import connect_redis
from usher.keys import ModelKeys
from usher.queue.records import QueueDefaults
from usher.testing.redis_topologies import LocalRedisCluster


def waits_by_node(client: redis.RedisCluster) -> dict[str, int]:
    stats = client.info("commandstats", target_nodes=client.PRIMARIES)
    return {
        node: int(per_node.get("cmdstat_wait", {}).get("calls", 0))
        for node, per_node in stats.items()
    }


def node_of(client: redis.RedisCluster, key: str) -> str:
    return str(client.get_node_from_key(key).name)  # type: ignore[no-untyped-call]


async def test_a_submit_waits_on_the_index_entrys_primary_too() -> None:
    with LocalRedisCluster() as cluster:
        sync = redis.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
        store = QueueStore(
            connect_redis(cluster.url), QueueDefaults(wait_replicas=1, wait_timeout_ms=2000)
        )
        # A request whose index entry lives on another primary than its model's queue.
        request = new_request(model="m")
        model_node = node_of(sync, ModelKeys("m").queue)
        while node_of(sync, keys.request_index(request.id)) == model_node:
            request = new_request(model="m")
        index_node = node_of(sync, keys.request_index(request.id))
        before = waits_by_node(sync)
        outcome = await store.submit(request)
        after = waits_by_node(sync)
        assert outcome.status == "queued"
        assert after[model_node] > before[model_node]
        assert after[index_node] > before[index_node]
        sync.close()
        await store.redis.aclose()


async def test_a_models_first_submit_waits_on_the_model_sets_primary_too() -> None:
    """The model set decides which queues the dispatchers walk: its entry lost in a
    failover, a request accepted for a new model would wait for the model's next Submit."""
    with LocalRedisCluster() as cluster:
        sync = redis.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
        store = QueueStore(
            connect_redis(cluster.url), QueueDefaults(wait_replicas=1, wait_timeout_ms=2000)
        )
        models_node = node_of(sync, keys.MODELS)
        model = next(
            f"m{n}" for n in range(100) if node_of(sync, ModelKeys(f"m{n}").queue) != models_node
        )
        request = new_request(model=model)
        while node_of(sync, keys.request_index(request.id)) == models_node:
            request = new_request(model=model)
        before = waits_by_node(sync)
        assert (await store.submit(request)).status == "queued"
        first = waits_by_node(sync)
        assert first[models_node] > before[models_node]
        assert sync.sismember(keys.MODELS, model)
        # Its next Submits leave the model set alone (written moments ago): no WAIT there.
        again = new_request(model=model)
        while node_of(sync, keys.request_index(again.id)) == models_node:
            again = new_request(model=model)
        assert (await store.submit(again)).status == "queued"
        assert waits_by_node(sync)[models_node] == first[models_node]
        sync.close()
        await store.redis.aclose()
