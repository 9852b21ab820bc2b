"""Highly available Redis setups (a 3+3 Redis Cluster, Sentinel with 1+1 and 3 sentinels)
started from the redis-server binary, with the whole stack on them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest

from usher.testing.redis_topologies import LocalRedisCluster, LocalSentinel

#: Twelve models: their keys ({model}) fall in slots of every primary of a 3-node cluster.
MODELS = tuple(f"m{i}:1b" for i in range(12))


def emulator_args(models: Sequence[str] = MODELS, tokens_per_second: int = 300) -> tuple[str, ...]:
    return (
        "--fleet",
        "2",
        "--models",
        ",".join(f"{m}@100MB" for m in models),
        "--max-loaded-models",
        str(len(models)),
        "--memory",
        "0",
        "--tokens-per-second",
        str(tokens_per_second),
        "--load-time",
        "0.05",
        "--parallel",
        "4",
        "--output-tokens",
        "8:16",
    )


TopologyServers = LocalRedisCluster | LocalSentinel


@pytest.fixture(params=["cluster", "sentinel"])
def topology(request: pytest.FixtureRequest) -> Iterator[TopologyServers]:
    servers: TopologyServers = (
        LocalRedisCluster(appendfsync="always")
        if request.param == "cluster"
        else LocalSentinel(appendfsync="always")
    )
    with servers:
        yield servers
