"""The whole flow on a Redis Cluster and on Sentinel whose servers require a password (the
sentinels one of their own) and, when redis-server was built with TLS, speak TLS only
(mutual: the client shows a certificate of the test CA). Every process reads the one
USHER_REDIS_URL (``rediss+cluster://:pw@…?ssl_ca_certs=…``,
``rediss+sentinel://:pw@…/usher/0?sentinel_password=…&ssl_…``)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from redis.exceptions import AuthenticationError

from tests.topologies.conftest import MODELS, TopologyServers
from tests.topologies.test_topologies import (
    ALICE,
    Load,
    every_model_watched,
    final_states,
    stack_on,
    stubs,
    submit_request,
)
from usher.connections import connect_redis
from usher.testing.certs import make_certificates
from usher.testing.redis_server import RedisSecurity, redis_tls_supported
from usher.testing.redis_topologies import LocalRedisCluster, LocalSentinel
from usher.v1 import (
    notifier_pb2,
    notifier_pb2_grpc,
    request_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

pytestmark = pytest.mark.slow
PASSWORD = "s3cret: with spaces & @"
SENTINEL_PASSWORD = "sentinels' own"
#: deploy/README's ACL user for Usher: its keys and its cancel channel (Redis 7 gives a new
#: user no channel), no dangerous commands. The password one word: the rules are words.
ACL_PASSWORD = "usher-acl-pw"
ACL_RULES = ("~usher:*", "&usher:*", "+@all", "-@dangerous")
needs_tls = pytest.mark.skipif(
    not redis_tls_supported(), reason="this redis-server was built without TLS"
)


@pytest.fixture(
    params=[
        ("cluster", "password"),
        ("sentinel", "password"),
        ("cluster", "acl"),
        ("sentinel", "acl"),
        pytest.param(("cluster", "tls"), marks=needs_tls),
        pytest.param(("sentinel", "tls"), marks=needs_tls),
    ],
    ids=lambda p: "-".join(p),
)
def secured(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TopologyServers]:
    kind, protection = request.param
    with protected(kind, protection == "tls", tmp_path, acl=protection == "acl") as servers:
        yield servers


@pytest.fixture(params=["cluster", "sentinel"])
def most_secured(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TopologyServers]:
    """A password, and TLS too when the binary has it."""
    with protected(request.param, redis_tls_supported(), tmp_path) as servers:
        yield servers


def protected(kind: str, tls: bool, tmp_path: Path, acl: bool = False) -> TopologyServers:
    security = RedisSecurity(
        password=ACL_PASSWORD if acl else PASSWORD,
        username="usher" if acl else None,
        user_rules=ACL_RULES if acl else (),
        tls=make_certificates(tmp_path / "certs") if tls else None,
        sentinel_password=SENTINEL_PASSWORD if kind == "sentinel" else None,
    )
    if kind == "cluster":
        return LocalRedisCluster(appendfsync="always", security=security)
    return LocalSentinel(appendfsync="always", security=security)


def a_data_node(servers: TopologyServers) -> int:
    if isinstance(servers, LocalRedisCluster):
        return servers.nodes[0].port
    return servers.primary.port


async def test_the_servers_refuse_a_client_without_the_password(secured: TopologyServers) -> None:
    """The protection is real: a client that does not give the password (but speaks TLS
    when the servers do) is refused; with the URL's password it gets through."""
    tls: dict[str, Any] = dict(secured.security.tls_options())
    with (
        pytest.raises(AuthenticationError),
        redis.Redis(port=a_data_node(secured), ssl=bool(tls), **tls) as anonymous,
    ):
        anonymous.ping()
    if isinstance(secured, LocalSentinel):
        sentinel = secured.sentinel_ports[0]
        with (
            pytest.raises(AuthenticationError),
            redis.Redis(port=sentinel, password=PASSWORD, ssl=bool(tls), **tls) as wrong,
        ):
            wrong.ping()  # the data nodes' password is not the sentinels'
    if tls:
        with pytest.raises(redis.ConnectionError), redis.Redis(port=a_data_node(secured)) as plain:
            plain.ping()  # no plain-text port at all
    client = connect_redis(secured.url)
    try:
        assert await client.set("usher:probe", b"1")
        assert await client.get("usher:probe") == b"1"
    finally:
        await client.aclose()


@pytest.mark.timeout(300)
async def test_the_whole_flow_runs_on_protected_servers(
    secured: TopologyServers, tmp_path: Path
) -> None:
    """Submit → dispatch → model server → Watch to the end, on every model's slot; then a
    running request cancelled (its cancel is published on the cancel channel)."""
    with stack_on(secured, tmp_path, tokens_per_second=8) as stack:
        async with stubs(stack) as (scheduler, notifier):
            watched = await every_model_watched(scheduler, notifier)
            for model, updates in zip(MODELS, watched, strict=True):
                final = updates[-1]
                assert final.kind == notifier_pb2.UPDATE_KIND_COMPLETED, (model, final)
                assert final.request.result.text == "".join(u.text_delta for u in updates)
            listed = await scheduler.List(scheduler_pb2.ListRequest(page_size=50), metadata=ALICE)
            assert {r.state for r in listed.requests} == {request_pb2.REQUEST_STATE_COMPLETED}
            assert len(listed.requests) == len(MODELS)
            await cancel_one_running(scheduler, notifier)


async def cancel_one_running(
    scheduler: scheduler_pb2_grpc.SchedulerServiceAsyncStub,
    notifier: notifier_pb2_grpc.NotifierServiceAsyncStub,
) -> None:
    """Cancel a request once it runs (1 to 2 s of answer): the Scheduler publishes the
    cancel; it ends CANCELLED. A busy machine may finish it first: then another."""
    for attempt in range(5):
        submitted = await scheduler.Submit(
            submit_request(MODELS[attempt], f"cancel me {attempt}"), metadata=ALICE
        )
        request_id = submitted.request.id
        watch = notifier.Watch(notifier_pb2.WatchRequest(id=request_id), metadata=ALICE, timeout=60)
        kinds = []
        async for update in watch:
            kinds.append(update.kind)
            if update.kind == notifier_pb2.UPDATE_KIND_RUNNING:
                break
        try:
            await scheduler.Cancel(scheduler_pb2.CancelRequest(id=request_id), metadata=ALICE)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
                watch.cancel()
                continue  # it finished before the cancel came
            raise
        kinds += [update.kind async for update in watch]
        assert kinds[-1] == notifier_pb2.UPDATE_KIND_CANCELLED, kinds
        return
    pytest.fail("every request finished before its cancel")


@pytest.mark.timeout(400)
async def test_a_primary_killed_on_protected_servers_loses_nothing(
    most_secured: TopologyServers, tmp_path: Path
) -> None:
    """The failover itself goes through the protection (sentinels authenticate to the
    servers, replicas to their primary, all over TLS) and so does the clients' finding of
    the promoted primary: with WAIT on, every accepted request completes."""
    env = {"USHER_REDIS_WAIT_REPLICAS": "1", "USHER_REDIS_WAIT_TIMEOUT_MS": "2000"}
    with stack_on(most_secured, tmp_path, env) as stack:
        async with stubs(stack) as (scheduler, _notifier):
            load = Load(scheduler)
            running = asyncio.create_task(load.run(count=60, rate=15))
            await asyncio.sleep(2)
            if isinstance(most_secured, LocalRedisCluster):
                victim = most_secured.kill_primary_of(f"usher:{{{MODELS[0]}}}:queue")
                await asyncio.to_thread(most_secured.wait_failover)
            else:
                old = most_secured.primary_port()
                victim = most_secured.kill_primary()
                await asyncio.to_thread(most_secured.wait_failover, old)
            victim.start()
            await running
            states = await final_states(scheduler, load.accepted, timeout=180)
    unfinished = {i: s for i, s in states.items() if s != request_pb2.REQUEST_STATE_COMPLETED}
    assert len(set(load.accepted)) == 60
    assert unfinished == {}, f"{unfinished} (logs in {tmp_path})"
