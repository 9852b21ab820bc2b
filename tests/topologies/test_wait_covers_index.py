"""With WAIT on, on a real Redis Cluster: a Submit waits for a replica on every primary it
wrote to that a failover could cost it (the model's and its id index entry's), so Get,
Watch and Cancel still find an accepted request after a primary is lost."""

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


async def test_a_submit_waits_on_the_index_entrys_primary_too() -> None:
    with LocalRedisCluster() as cluster:
        sync = redis.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
        store = QueueStore(
            connect_redis(cluster.url), QueueDefaults(wait_replicas=1, wait_timeout_ms=2000)
        )
        # A request whose index entry lives on another primary than its model's queue.
        request = new_request(model="m")
        model_node = sync.get_node_from_key(ModelKeys("m").queue).name  # type: ignore[no-untyped-call]
        while sync.get_node_from_key(keys.request_index(request.id)).name == model_node:  # type: ignore[no-untyped-call]
            request = new_request(model="m")
        index_node = sync.get_node_from_key(keys.request_index(request.id)).name  # type: ignore[no-untyped-call]
        before = waits_by_node(sync)
        outcome = await store.submit(request)
        after = waits_by_node(sync)
        assert outcome.status == "queued"
        assert after[model_node] > before[model_node]
        assert after[index_node] > before[index_node]
        sync.close()
        await store.redis.aclose()
