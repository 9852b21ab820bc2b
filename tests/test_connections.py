"""What each USHER_REDIS_URL names (pure parsing; the clients are exercised against real
Redis Cluster and Sentinel setups in tests/topologies)."""

from __future__ import annotations

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st
from redis.exceptions import AuthenticationError

from usher.connections import connect_redis, parse_redis_url, redacted_redis_url
from usher.testing.redis_server import RedisSecurity, RedisServer


def test_a_plain_url_passes_through_to_redis_py_without_our_options() -> None:
    target = parse_redis_url("rediss://u:p%40ss@host:6380/2?retry_seconds=9&ssl_cert_reqs=none")
    assert target.topology == "standalone"
    assert target.tls
    assert target.retry_seconds == 9
    assert target.url == "rediss://u:p%40ss@host:6380/2?ssl_cert_reqs=none"


def test_a_sentinel_url_names_sentinels_service_db_and_credentials() -> None:
    target = parse_redis_url(
        "redis+sentinel://:s3cret@s1:26379,s2:26380,[::1]:26381/mymaster/3?sentinel_password=x"
    )
    assert target.topology == "sentinel"
    assert target.nodes == (("s1", 26379), ("s2", 26380), ("::1", 26381))
    assert (target.service, target.db) == ("mymaster", 3)
    assert (target.username, target.password) == (None, "s3cret")
    assert target.sentinel_password == "x"
    assert target.retry_seconds == 30
    assert not target.tls


def test_a_cluster_url_names_seed_nodes_tls_and_an_acl_user() -> None:
    target = parse_redis_url(
        "rediss+cluster://usher:pw@a:7000,b?ssl_ca_certs=/ca.pem&retry_seconds=12.5"
    )
    assert target.topology == "cluster"
    assert target.nodes == (("a", 7000), ("b", 6379))
    assert (target.username, target.password) == ("usher", "pw")
    assert target.tls and target.tls_options == {"ssl_ca_certs": "/ca.pem"}
    assert target.retry_seconds == 12.5


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("http://h:1", "scheme"),
        ("redis+sentinel://h:1", "service"),
        ("redis+sentinel://h:1/svc/x", "database"),
        ("redis+cluster://h:1/3", "database 0"),
        ("redis+cluster://h:notaport", "host:port"),
        ("redis+cluster://h:1?colour=red", "colour"),
        ("redis+cluster://h:1?retry_seconds=soon", "retry_seconds"),
        ("redis://:pw@h:1?retry_seconds=-1", "retry_seconds"),
    ],
)
def test_a_bad_url_is_refused_naming_the_setting_and_the_fault(url: str, named: str) -> None:
    with pytest.raises(ValueError, match="USHER_REDIS_URL") as caught:
        parse_redis_url(url)
    assert named in str(caught.value)


def test_credentials_read_as_redis_py_reads_them() -> None:
    assert parse_redis_url("redis+cluster://usher@a:1").username == "usher"
    assert parse_redis_url("redis+cluster://usher@a:1").password is None
    assert parse_redis_url("redis+cluster://:p%3Aw@a:1").password == "p:w"


def test_messages_never_show_the_password() -> None:
    assert (
        redacted_redis_url("redis+cluster://u:hunter2@a:1,b:2") == "redis+cluster://u:***@a:1,b:2"
    )
    with pytest.raises(ValueError) as caught:
        parse_redis_url("redis+sentinel://:hunter2@h:1")
    assert "hunter2" not in str(caught.value)
    # The sentinels' own password rides in the query.
    redacted = redacted_redis_url("redis+sentinel://h:1/svc?sentinel_password=hunter3&x=/a")
    assert redacted == "redis+sentinel://h:1/svc?sentinel_password=***&x=/a"
    with pytest.raises(ValueError) as caught:
        parse_redis_url("redis+sentinel://h:1/svc/x?sentinel_password=hunter3")
    assert "hunter3" not in str(caught.value)


@given(
    st.lists(
        st.tuples(st.from_regex(r"[a-z][a-z0-9.-]{0,20}", fullmatch=True), st.integers(1, 65535)),
        min_size=1,
        max_size=6,
    )
)
def test_every_seed_node_is_kept_in_order(nodes: list[tuple[str, int]]) -> None:
    url = "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in nodes)
    assert parse_redis_url(url).nodes == tuple(nodes)


async def test_a_refused_password_is_not_retried_for_the_whole_budget() -> None:
    """A wrong password is a ConnectionError to redis-py, but waiting never mends it: the
    call fails on the first refusal (the server's ACL LOG counts every denied AUTH), not
    after retry_seconds of attempts."""
    with RedisServer(security=RedisSecurity(password="right")) as server:
        client = connect_redis(f"redis://:wrong@127.0.0.1:{server.port}/0?retry_seconds=30")
        try:
            with pytest.raises(AuthenticationError):
                await client.get("anything")
        finally:
            await client.aclose()
        with redis.Redis(port=server.port, password="right") as admin:
            log = admin.acl_log()
    assert sum(int(entry["count"]) for entry in log if entry["reason"] == "auth") == 1
