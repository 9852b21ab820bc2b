"""Addresses that name several replicas become balanced gRPC targets (pure), and servers cap
connection age from the environment."""

from __future__ import annotations

import pytest

from usher.balancing import ROUND_ROBIN, balanced_target, channel_target, split_addresses
from usher.config import ConfigError
from usher.server import connection_age_options


def no_dns(host: str, port: int) -> list[str]:
    raise AssertionError(f"{host} should not be resolved")


def test_one_address_or_a_grpc_target_passes_through() -> None:
    assert balanced_target("pool:50052", no_dns) == ("pool:50052", "")
    assert balanced_target("dns:///usher-pool:50052", no_dns) == ("dns:///usher-pool:50052", "")


def test_a_comma_list_of_ips_becomes_one_target_of_every_replica() -> None:
    target, authority = balanced_target("127.0.0.1:5001, 127.0.0.1:5002", no_dns)
    assert target == "ipv4:127.0.0.1:5001,127.0.0.1:5002"
    assert authority == "127.0.0.1:5001"
    assert balanced_target("[::1]:1,[::1]:2", no_dns)[0] == "ipv6:[::1]:1,[::1]:2"


def test_names_in_a_list_are_resolved_and_the_first_names_the_authority() -> None:
    addresses = {"a": ["10.0.0.1", "10.0.0.2"], "b": ["10.0.0.3"]}
    target, authority = balanced_target("a:7,b:8", lambda host, _port: addresses[host])
    assert target == "ipv4:10.0.0.1:7,10.0.0.2:7,10.0.0.3:8"
    assert authority == "a:7"


@pytest.mark.parametrize("bad", ["a:1,b", "a:1,:2", "a:1,b:x", "a:1,b:70000"])
def test_a_bad_item_is_named(bad: str) -> None:
    with pytest.raises(ValueError, match="is not host:port"):
        split_addresses(bad)


def test_every_channel_balances_round_robin() -> None:
    target, options = channel_target("127.0.0.1:1,127.0.0.1:2")
    assert target.startswith("ipv4:")
    assert ("grpc.service_config", ROUND_ROBIN) in options
    assert channel_target("localhost:1")[1] == [("grpc.service_config", ROUND_ROBIN)]


def test_servers_cap_connection_age_with_grace() -> None:
    assert dict(connection_age_options({})) == {
        "grpc.max_connection_age_ms": 60_000,
        "grpc.max_connection_age_grace_ms": 300_000,
    }
    env = {
        "USHER_GRPC_MAX_CONNECTION_AGE_SECONDS": "5",
        "USHER_GRPC_MAX_CONNECTION_AGE_GRACE_SECONDS": "1.5",
    }
    assert dict(connection_age_options(env)) == {
        "grpc.max_connection_age_ms": 5000,
        "grpc.max_connection_age_grace_ms": 1500,
    }
    assert connection_age_options({"USHER_GRPC_MAX_CONNECTION_AGE_SECONDS": "0"}) == []
    with pytest.raises(ConfigError, match="USHER_GRPC_MAX_CONNECTION_AGE"):
        connection_age_options({"USHER_GRPC_MAX_CONNECTION_AGE_SECONDS": "-1"})
