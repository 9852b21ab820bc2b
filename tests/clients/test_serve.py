"""``usher serve``'s settings: what each service of the one process reads."""

from __future__ import annotations

import asyncio

import httpx

from clients.serve import MAX_DEFAULT_DISPATCH, dial_address, scheduler_settings, serve_environment
from services.pool.settings import InstanceSpec
from usher.auth import parse_token_map
from usher.testing.stack import LocalStack, StackConfig


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


def _instance(name: str, **spec: int) -> InstanceSpec:
    return InstanceSpec(id=name, base_url=f"http://{name}:11434", **spec)


def test_unset_dispatch_concurrency_covers_the_fleets_slots() -> None:
    fleet = [_instance("a", parallel=24), _instance("b", parallel=4, max_loaded_models=3)]
    # 36 local slots: 36 loops for the local fleet, and every eighth for the provider's.
    assert scheduler_settings({}, fleet).dispatch_concurrency == 41
    # A small fleet keeps the Scheduler's default; a huge one stops at the bound.
    assert scheduler_settings({}, [_instance("a", parallel=2)]).dispatch_concurrency == 16
    huge = [_instance("a", parallel=4096)]
    assert scheduler_settings({}, huge).dispatch_concurrency == MAX_DEFAULT_DISPATCH
    # Set, it is what it says.
    env = {"USHER_DISPATCH_CONCURRENCY": "3"}
    assert scheduler_settings(env, fleet).dispatch_concurrency == 3


async def test_every_slot_of_the_fleet_runs_a_request_at_once() -> None:
    """usher serve with a model server of 24 slots and no USHER_DISPATCH_CONCURRENCY: 24
    requests at once are all generating together (not the Scheduler's default 16)."""
    slots = 24
    config = StackConfig(
        all_in_one=True,
        emulator_args=(
            "--tokens-per-second",
            "20",
            "--output-tokens",
            "20:20",
            "--ttft",
            "0",
            "--load-time",
            "0",
            "--parallel",
            str(slots),
        ),
        instance_options=f";parallel={slots}",
        scheduler_env={"USHER_QUEUE_MAX_SIZE": "1000"},
        gateway=True,
    )
    with LocalStack(config) as stack:
        async with httpx.AsyncClient(timeout=60) as http:

            async def generate(n: int) -> int:
                reply = await http.post(
                    f"{stack.gateway_url}/api/generate",
                    json={"model": "llama3.2:1b", "prompt": f"at once {n}", "stream": False},
                    headers={"Authorization": "Bearer alice-token"},
                )
                return reply.status_code

            assert await asyncio.gather(*(generate(n) for n in range(slots))) == [200] * slots
            stats = (await http.get(f"{stack.model_urls[0]}/_emulator/stats")).json()
        assert stats["models"]["llama3.2:1b"]["in_flight_max"] == slots
