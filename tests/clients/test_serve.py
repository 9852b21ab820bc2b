"""``usher serve``'s settings: what each service of the one process reads."""

from __future__ import annotations

from clients.serve import dial_address, serve_environment
from usher.auth import parse_token_map


def test_a_wildcard_listen_address_is_dialled_on_loopback() -> None:
    assert dial_address("0.0.0.0:50051") == "127.0.0.1:50051"
    assert dial_address("[::]:50052") == "127.0.0.1:50052"
    assert dial_address("10.0.0.5:50053") == "10.0.0.5:50053"


def test_the_services_reach_each_other_at_their_own_listen_addresses() -> None:
    env = serve_environment(
        {
            "USHER_SCHEDULER_LISTEN": "0.0.0.0:6001",
            "USHER_POOL_ADDRESS": "elsewhere:1",  # a client setting: not this process's
            "USHER_SERVICE_TOKEN": "svc",
        }
    )
    assert env["USHER_SCHEDULER_ADDRESS"] == "127.0.0.1:6001"
    assert env["USHER_POOL_ADDRESS"] == "127.0.0.1:50052"
    assert env["USHER_NOTIFIER_ADDRESS"] == "127.0.0.1:50053"
    assert env["USHER_SERVICE_TOKEN"] == "svc"


def test_without_a_service_token_one_is_minted_with_the_service_role() -> None:
    env = serve_environment({"USHER_API_TOKENS": "alice-token=alice@acme"})
    token = env["USHER_SERVICE_TOKEN"]
    tokens = parse_token_map(env["USHER_API_TOKENS"])
    assert len(token) >= 24 and "alice-token" in tokens
    assert "service" in tokens[token].roles
    assert serve_environment({})["USHER_SERVICE_TOKEN"] != token  # never a fixed one
