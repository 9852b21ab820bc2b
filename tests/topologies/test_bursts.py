"""A burst of calls beyond a client's connections waits for free ones, on every topology
(the standalone pool's own test: tests/test_connections.py)."""

from __future__ import annotations

import asyncio

from tests.topologies.conftest import TopologyServers
from usher.connections import connect_redis, is_cluster


async def test_calls_beyond_the_connections_wait_their_turn(topology: TopologyServers) -> None:
    client = connect_redis(topology.url, max_connections=8)
    try:
        # Each holds its connection 0.2 s: 60 of them need 8 connections 8 times over.
        async def blocking_read(n: int) -> object:
            return await client.blpop([f"{{burst}}:{n}"], timeout=0.2)

        async def pipelined(n: int) -> list[object]:
            pipe = client.pipeline(transaction=not is_cluster(client))
            pipe.set(f"{{burst}}:p{n}", n)
            pipe.get(f"{{burst}}:p{n}")
            return list(await pipe.execute())

        results = await asyncio.gather(
            *(blocking_read(n) for n in range(60)), *(pipelined(n) for n in range(60))
        )
        assert results[:60] == [None] * 60
        assert results[60:] == [[True, str(n).encode()] for n in range(60)]
    finally:
        await client.aclose()
