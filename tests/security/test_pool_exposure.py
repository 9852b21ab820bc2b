"""What the Pool must not hand out: its own secrets to an upstream an admin names, model
servers' addresses to ordinary callers, and metrics beyond the service's own interface."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import psutil  # type: ignore[import-untyped]  # psutil ships no stubs
import pytest

from services.pool.settings import InstanceSpec, upstream_api_key
from services.pool.upstream import HttpUpstream
from services.pool.upstream_kinds import make_upstream
from services.scheduler.app import SchedulerApp
from services.scheduler.settings import SchedulerSettings
from tests.pool.conftest import fast_emulator_config
from tests.pool.test_pool_service import (
    ROOT,
    SVC,
    RunningPool,
    generate_request,
    reserve,
    running_pool,
    settings_for,
)
from usher.auth import parse_token_map
from usher.config import ConfigError
from usher.emulator import EmulatorFleet
from usher.metrics import metrics_host
from usher.testing import free_port
from usher.testing.redis_server import ExternalRedis, RedisServer
from usher.v1 import pool_pb2

ALICE = (("authorization", "Bearer alice-token"),)


@pytest.fixture
def make_pool(
    redis_server: RedisServer | ExternalRedis,
) -> Callable[..., contextlib.AbstractAsyncContextManager[RunningPool]]:
    def make(urls: Sequence[str]) -> contextlib.AbstractAsyncContextManager[RunningPool]:
        return running_pool(settings_for(redis_server.url, urls))

    return make


def test_an_upstream_key_comes_only_from_the_allow_listed_prefix(tmp_path: Path) -> None:
    for name in (
        "USHER_API_TOKENS",
        "USHER_ENCRYPTION_KEYS",
        "OPENAI_API_KEY",
        "USHER_UPSTREAM_KEY_",
    ):
        with pytest.raises(ConfigError, match="api_key_env"):
            InstanceSpec(
                id="x", base_url="https://api.example.com", kind="openai", api_key_env=name
            )
        assert upstream_api_key(name, {name: "secret"}) is None
    secrets = tmp_path / "upstream-keys"
    secrets.write_text("# mounted\nUSHER_UPSTREAM_KEY_OPENAI = from-file\n")
    env = {"USHER_UPSTREAM_KEYS_FILE": str(secrets)}
    assert upstream_api_key("USHER_UPSTREAM_KEY_OPENAI", env) == "from-file"
    assert (
        upstream_api_key("USHER_UPSTREAM_KEY_OPENAI", {**env, "USHER_UPSTREAM_KEY_OPENAI": "e"})
        == "e"
    )
    assert upstream_api_key("USHER_UPSTREAM_KEY_OTHER", env) is None


async def test_registering_an_instance_cannot_name_the_pools_secrets(make_pool: Any) -> None:
    async with EmulatorFleet([fast_emulator_config()]) as fleet, make_pool(fleet.urls) as pool:
        config = pool_pb2.InstanceConfig(
            id="exfil",
            base_url="https://attacker.example.com",
            kind=pool_pb2.INSTANCE_KIND_OPENAI,
            api_key_env="USHER_API_TOKENS",
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pool.admin.RegisterInstance(
                pool_pb2.RegisterInstanceRequest(config=config), metadata=ROOT
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "USHER_UPSTREAM_KEY_" in (info.value.details() or "")
        listed = await pool.stub.ListInstances(pool_pb2.ListInstancesRequest(), metadata=SVC)
        assert "exfil" not in [i.config.id for i in listed.instances]


async def test_ordinary_callers_see_no_model_server_addresses(make_pool: Any) -> None:
    async with EmulatorFleet([fast_emulator_config()]) as fleet, make_pool(fleet.urls) as pool:
        for_service = await pool.stub.ListInstances(pool_pb2.ListInstancesRequest(), metadata=SVC)
        assert for_service.instances[0].config.base_url.startswith("http://127.0.0.1:")
        for_user = await pool.stub.ListInstances(pool_pb2.ListInstancesRequest(), metadata=ALICE)
        (instance,) = for_user.instances
        assert instance.config.id == "ollama-0"
        assert instance.config.base_url == "" and instance.config.api_key_env == ""
        assert "127.0.0.1" not in str(instance)


async def test_failover_errors_name_instances_not_their_addresses(make_pool: Any) -> None:
    async with EmulatorFleet([fast_emulator_config()]) as fleet, make_pool(fleet.urls) as pool:
        address = fleet.urls[0].split("://", 1)[1]
        fleet[0].set_faults(fail_next=5, fail_status=500)
        slot = await reserve(pool)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in pool.stub.Generate(generate_request(slot), metadata=SVC):
                pass
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        text = info.value.details() or ""
        assert "ollama-0" in text and address not in text and "http://" not in text

        fleet[0].set_faults(fail_next=0, error_after_tokens=2, error_message="runner crashed")
        slot = await reserve(pool)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in pool.stub.Generate(generate_request(slot), metadata=SVC):
                pass
        assert info.value.code() == grpc.StatusCode.ABORTED
        text = info.value.details() or ""
        assert "runner crashed" in text and address not in text


def test_metrics_listen_where_the_service_does_unless_told() -> None:
    assert metrics_host("127.0.0.1:50051", {}) == "127.0.0.1"
    assert metrics_host("[::1]:50051", {}) == "::1"
    assert metrics_host("0.0.0.0:50051", {}) == "0.0.0.0"
    assert metrics_host(":50051", {}) == "0.0.0.0"
    assert metrics_host("127.0.0.1:50051", {"USHER_METRICS_HOST": "0.0.0.0"}) == "0.0.0.0"


async def test_a_loopback_service_serves_metrics_on_loopback_only(
    redis_server: RedisServer | ExternalRedis,
) -> None:
    metrics_port = free_port()
    app = SchedulerApp(
        SchedulerSettings(
            redis_url=redis_server.url,
            listen=f"127.0.0.1:{free_port()}",
            tokens=parse_token_map("t=u@o"),
            metrics_port=metrics_port,
            shutdown_grace_seconds=0.2,
        )
    )
    await app.start()
    try:
        bound = [
            c.laddr.ip
            for c in psutil.Process().net_connections(kind="tcp")
            if c.laddr and c.laddr.port == metrics_port and c.status == psutil.CONN_LISTEN
        ]
        assert bound == ["127.0.0.1"]
    finally:
        await app.stop()


async def test_what_the_fuzzer_found_in_the_pool_is_refused_or_dropped() -> None:
    # A base URL with a control character failed later, inside the HTTP client, as INTERNAL.
    with pytest.raises(ConfigError, match="base_url"):
        InstanceSpec(id="x", base_url="http://\x1bhost:1", kind="ollama")
    # A caller's traceparent that is not W3C's (non-ASCII here) broke the upstream call.
    upstream = make_upstream("ollama", "http://127.0.0.1:1")
    assert isinstance(upstream, HttpUpstream)
    try:
        assert upstream.headers("ééé") == {}
        assert upstream.headers("00-x\n") == {}
        good = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
        assert upstream.headers(good) == {"traceparent": good}
    finally:
        await upstream.aclose()
