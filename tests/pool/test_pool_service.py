"""The Pool as a real gRPC server on a socket, with real Redis and an emulated Ollama fleet."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from services.pool.app import PoolApp
from services.pool.placer import place_once
from services.pool.registry import CONTROL_CONNECTIONS, MIN_CONNECTIONS, connection_limit
from services.pool.routing import Strategy
from services.pool.settings import InstanceSpec, PoolSettings
from tests.pool.conftest import fast_emulator_config
from usher import keys
from usher.auth import parse_token_map
from usher.emulator import EmulatorFleet, model_spec
from usher.emulator.config import FaultConfig
from usher.inprocess import LocalChannel
from usher.keys import ModelKeys
from usher.testing import free_port
from usher.testing.redis_server import ExternalRedis, RedisServer
from usher.v1 import pool_pb2, pool_pb2_grpc, request_pb2

TOKENS = "svc-token=scheduler@usher:service,root-token=root@ops:admin,alice-token=alice@acme"
SVC = (("authorization", "Bearer svc-token"),)
ROOT = (("authorization", "Bearer root-token"),)
MODEL = "llama3.2:1b"


@dataclass
class RunningPool:
    app: PoolApp
    stub: pool_pb2_grpc.PoolServiceAsyncStub
    admin: pool_pb2_grpc.PoolAdminServiceAsyncStub
    channel: grpc.aio.Channel


def settings_for(
    redis_url: str,
    urls: Sequence[str],
    memory_budget_bytes: int = 0,
    parallel: int = 2,
    **overrides: Any,
) -> PoolSettings:
    instances = tuple(
        InstanceSpec(
            id=f"ollama-{i}",
            base_url=url,
            kind="ollama",
            parallel=parallel,
            memory_budget_bytes=memory_budget_bytes,
        )
        for i, url in enumerate(urls)
    )
    base = PoolSettings(
        instances=instances,
        listen=f"127.0.0.1:{free_port()}",
        redis_url=redis_url,
        tokens=parse_token_map(TOKENS),
        health_interval_seconds=0.2,
        health_timeout_seconds=1.0,
        placement_interval_seconds=3600,
        shutdown_grace_seconds=0.5,
        circuit_failure_threshold=3,
        circuit_open_seconds=0.3,
    )
    return base.replace(**overrides)


@contextlib.asynccontextmanager
async def running_pool(
    settings: PoolSettings, transport: str = "grpc"
) -> AsyncIterator[RunningPool]:
    """The Pool as the trio's dispatchers call it (gRPC), or as ``usher serve``'s do
    (``transport="in-process"``: its public service through the in-process channel)."""
    app = PoolApp(settings)
    await app.start()
    channel = grpc.aio.insecure_channel(settings.listen)
    calls: grpc.aio.Channel = channel
    if transport == "in-process":
        calls = LocalChannel.serving(app.registrations).as_channel()
    try:
        yield RunningPool(
            app,
            pool_pb2_grpc.PoolServiceStub(calls),
            pool_pb2_grpc.PoolAdminServiceStub(channel),
            channel,
        )
    finally:
        await channel.close()
        await app.stop()


@pytest.fixture(params=["grpc", "in-process"])
def make_pool(
    request: pytest.FixtureRequest,
    redis_server: RedisServer | ExternalRedis,
    redis_client: aioredis.Redis,
) -> Callable[..., contextlib.AbstractAsyncContextManager[RunningPool]]:
    def make(
        urls: Sequence[str], **overrides: Any
    ) -> contextlib.AbstractAsyncContextManager[RunningPool]:
        return running_pool(settings_for(redis_server.url, urls, **overrides), request.param)

    return make


@contextlib.asynccontextmanager
async def room_for_one_of_two(make_pool: Any) -> AsyncIterator[RunningPool]:
    """A Pool over one instance with two 1 GiB models and room (1.5 GiB) for one of them."""
    small = [model_spec("llama3.2:1b@1GiB"), model_spec("qwen2.5:0.5b@1GiB")]
    config = fast_emulator_config(models=small, memory_budget=int(1.5 * 1024**3))
    async with (
        EmulatorFleet([config]) as fleet,
        make_pool(
            fleet.urls, idle_unload_seconds=3600, memory_budget_bytes=int(1.5 * 1024**3)
        ) as pool,
    ):
        yield pool


def generate_request(
    slot: pool_pb2.Slot, prompt: str = "hello", **options: Any
) -> pool_pb2.GenerateRequest:
    request = pool_pb2.GenerateRequest(
        slot_id=slot.id,
        request_id="r1",
        model=slot.model,
        generate=request_pb2.GenerateInput(prompt=prompt),
        stream=True,
    )
    for name, value in options.items():
        setattr(request.options, name, value)
    return request


async def reserve(pool: RunningPool, model: str = MODEL, wait: float = 2.0) -> pool_pb2.Slot:
    request = pool_pb2.ReserveRequest(models=[model], holder="test")
    request.wait.FromMilliseconds(int(wait * 1000))
    reply = await pool.stub.Reserve(request, metadata=SVC)
    assert reply.HasField("slot"), "no slot granted"
    return reply.slot


async def run(
    pool: RunningPool, model: str = MODEL, prompt: str = "hello"
) -> list[pool_pb2.GenerateResponse]:
    slot = await reserve(pool, model)
    return [r async for r in pool.stub.Generate(generate_request(slot, prompt), metadata=SVC)]


async def test_reserve_then_generate_streams_tokens_and_a_result(make_pool: Any) -> None:
    async with EmulatorFleet([fast_emulator_config()]) as fleet, make_pool(fleet.urls) as pool:
        events = await run(pool)
        kinds = [e.WhichOneof("event") for e in events]
        assert kinds[0] == "started" and kinds[-1] == "done"
        assert "delta" in kinds
        done = events[-1].done
        assert done.result.text == "".join(e.delta.text for e in events if e.HasField("delta"))
        assert done.result.served_by_instance == "ollama-0"
        assert done.usage.completion_tokens > 0
        stats = await pool.stub.GetModelStats(
            pool_pb2.GetModelStatsRequest(models=[MODEL]), metadata=SVC
        )
        assert stats.stats[0].processed == 1
        assert stats.stats[0].active == 0  # the slot was released


async def test_callers_need_the_service_role(make_pool: Any) -> None:
    async with EmulatorFleet([fast_emulator_config()]) as fleet, make_pool(fleet.urls) as pool:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pool.stub.Reserve(
                pool_pb2.ReserveRequest(models=[MODEL]),
                metadata=(("authorization", "Bearer alice-token"),),
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pool.stub.Reserve(pool_pb2.ReserveRequest(models=[MODEL]))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_affinity_routes_to_the_instance_that_has_the_model_loaded(make_pool: Any) -> None:
    config = fast_emulator_config(load_time=0.05)
    async with EmulatorFleet([config, config, config]) as fleet, make_pool(fleet.urls) as pool:
        for _ in range(12):
            await run(pool)
        loads = [server.stats.loads for server in fleet]
        assert sum(loads) == 1, loads
    # The same workload round-robin loads the model everywhere.
    async with (
        EmulatorFleet([config, config, config]) as fleet,
        make_pool(fleet.urls, strategy=Strategy.WEIGHTED_ROUND_ROBIN) as pool,
    ):
        for _ in range(12):
            await run(pool)
        assert sum(server.stats.loads for server in fleet) == 3


async def test_failure_before_the_first_token_fails_over(make_pool: Any) -> None:
    config = fast_emulator_config()
    async with EmulatorFleet([config, config]) as fleet, make_pool(fleet.urls) as pool:
        await run(pool)  # loads on one instance; affinity keeps choosing it
        busy = next(i for i, s in enumerate(fleet) if s.stats.loads)
        fleet[busy].set_faults(fail_next=1, fail_status=500)
        events = await run(pool)
        assert events[-1].done.result.served_by_instance == f"ollama-{1 - busy}"


async def test_an_instance_that_dies_leaves_rotation_and_work_goes_elsewhere(
    make_pool: Any,
) -> None:
    config = fast_emulator_config()
    async with EmulatorFleet([config, config]) as fleet, make_pool(fleet.urls) as pool:
        await run(pool)
        busy = next(i for i, s in enumerate(fleet) if s.stats.loads)
        await fleet[busy].crash()
        events = await run(pool)
        assert events[-1].done.result.served_by_instance == f"ollama-{1 - busy}"
        listed = await pool.stub.ListInstances(pool_pb2.ListInstancesRequest(), metadata=SVC)
        health = {i.config.id: i.health for i in listed.instances}
        assert health[f"ollama-{busy}"] == pool_pb2.INSTANCE_HEALTH_UNHEALTHY
        await fleet[busy].restart()
        for _ in range(50):
            listed = await pool.stub.ListInstances(pool_pb2.ListInstancesRequest(), metadata=SVC)
            if all(i.health == pool_pb2.INSTANCE_HEALTH_HEALTHY for i in listed.instances):
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the instance did not come back into rotation")


async def test_an_error_mid_stream_ends_the_stream_cleanly(make_pool: Any) -> None:
    async with EmulatorFleet([fast_emulator_config()]) as fleet, make_pool(fleet.urls) as pool:
        fleet[0].set_faults(error_after_tokens=3, error_message="model runner crashed")
        slot = await reserve(pool)
        seen: list[str] = []

        async def consume() -> None:
            async for event in pool.stub.Generate(generate_request(slot), metadata=SVC):
                seen.append(event.WhichOneof("event") or "")

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await consume()
        assert info.value.code() == grpc.StatusCode.ABORTED
        assert "model runner crashed" in (info.value.details() or "")
        assert "delta" in seen
        usage = await pool.app.slots.usage(["ollama-0"], MODEL)
        assert usage["ollama-0"].model_active == 0


async def test_circuit_opens_on_failures_and_recovers(make_pool: Any) -> None:
    async with EmulatorFleet([fast_emulator_config()]) as fleet, make_pool(fleet.urls) as pool:
        fleet[0].set_faults(fail_next=3, fail_status=500)
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await run(pool)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        listed = await pool.stub.ListInstances(pool_pb2.ListInstancesRequest(), metadata=SVC)
        assert listed.instances[0].circuit == pool_pb2.CIRCUIT_STATE_OPEN
        request = pool_pb2.ReserveRequest(models=[MODEL])
        request.wait.FromMilliseconds(100)
        assert not (await pool.stub.Reserve(request, metadata=SVC)).HasField("slot")
        await asyncio.sleep(0.35)  # open period over: half-open admits a trial
        events = await run(pool)
        assert events[-1].HasField("done")
        listed = await pool.stub.ListInstances(pool_pb2.ListInstancesRequest(), metadata=SVC)
        assert listed.instances[0].circuit == pool_pb2.CIRCUIT_STATE_CLOSED


async def test_slot_limits_hold_with_two_pool_replicas(make_pool: Any) -> None:
    config = fast_emulator_config(tokens_per_second=400, num_parallel=4)
    async with EmulatorFleet([config]) as fleet:
        async with make_pool(fleet.urls) as first, make_pool(fleet.urls) as second:

            async def worker(pool: RunningPool) -> None:
                for _ in range(6):
                    await run(pool)

            await asyncio.gather(*(worker(p) for p in (first, second) for _ in range(5)))
        stats = fleet[0].stats
        assert stats.requests_served == 60
        assert stats.models[MODEL].in_flight_max == 2  # parallel=2 per model on the instance


async def test_closing_the_stream_stops_the_upstream(make_pool: Any) -> None:
    config = fast_emulator_config(tokens_per_second=40, output_tokens=(400, 400))
    async with EmulatorFleet([config]) as fleet, make_pool(fleet.urls) as pool:
        slot = await reserve(pool)
        call = pool.stub.Generate(generate_request(slot), metadata=SVC)
        deltas = 0
        async for event in call:
            if event.HasField("delta"):
                deltas += 1
                if deltas == 2:
                    break
        call.cancel()
        for _ in range(50):
            if fleet[0].stats.in_flight == 0:
                break
            await asyncio.sleep(0.02)
        assert fleet[0].stats.in_flight == 0
        assert fleet[0].stats.tokens_generated < 100
        usage = await pool.app.slots.usage(["ollama-0"], MODEL)
        assert usage["ollama-0"].model_active == 0


async def test_fallback_model_serves_when_the_model_is_missing(make_pool: Any) -> None:
    config = fast_emulator_config(models=[model_spec("llama3.2:1b")])
    async with (
        EmulatorFleet([config]) as fleet,
        make_pool(fleet.urls, fallback_models={"llama3.1:70b": ("llama3.2:1b",)}) as pool,
    ):
        # The big model is not on the fleet; its slot is asked for by name, then the chain serves.
        grant = await pool.app.slots.try_reserve("ollama-0", "llama3.1:70b", 2, 0, "test", 1)
        assert grant is not None
        request = pool_pb2.GenerateRequest(
            slot_id=grant.id, model="llama3.1:70b", generate=request_pb2.GenerateInput(prompt="hi")
        )
        events = [e async for e in pool.stub.Generate(request, metadata=SVC)]
        assert events[-1].done.result.served_by_model == "llama3.2:1b"


async def test_demand_loads_models_and_evicts_lru_to_fit_memory(
    make_pool: Any, redis_client: aioredis.Redis
) -> None:
    async with room_for_one_of_two(make_pool) as pool:
        await run(pool, "llama3.2:1b")  # loaded, now idle (not yet past the idle TTL)
        await redis_client.sadd(keys.MODELS, "qwen2.5:0.5b")
        await redis_client.zadd(ModelKeys("qwen2.5:0.5b").queue, {"0000000000000001:X": 1})
        state = pool.app.registry.instances["ollama-0"]
        state.last_used["llama3.2:1b"] = time.time() - 60  # idle a minute: evictable, not expired
        await pool.app.registry.check(state)
        actions = await place_once(pool.app.registry, pool.app.slots)
        assert [(a.kind, a.model) for a in actions] == [
            ("unload", "llama3.2:1b"),
            ("load", "qwen2.5:0.5b"),
        ]
        assert set(state.loaded) == {"qwen2.5:0.5b"}


async def test_admin_registers_drains_and_weights_instances(make_pool: Any) -> None:
    async with (
        EmulatorFleet([fast_emulator_config(), fast_emulator_config()]) as fleet,
        make_pool(fleet.urls[:1]) as pool,
    ):
        config = pool_pb2.InstanceConfig(
            id="late",
            base_url=fleet.urls[1],
            kind=pool_pb2.INSTANCE_KIND_OLLAMA,
            weight=2,
            parallel=1,
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pool.admin.RegisterInstance(
                pool_pb2.RegisterInstanceRequest(config=config), metadata=SVC
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        added = await pool.admin.RegisterInstance(
            pool_pb2.RegisterInstanceRequest(config=config), metadata=ROOT
        )
        assert added.instance.health == pool_pb2.INSTANCE_HEALTH_HEALTHY
        bad = pool_pb2.InstanceConfig(
            id="bad", base_url="ftp://x", kind=pool_pb2.INSTANCE_KIND_OLLAMA
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pool.admin.RegisterInstance(
                pool_pb2.RegisterInstanceRequest(config=bad), metadata=ROOT
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "base_url" in (info.value.details() or "")
        await pool.admin.DrainInstance(
            pool_pb2.DrainInstanceRequest(id="ollama-0", drain=True), metadata=ROOT
        )
        events = await run(pool)
        assert events[-1].done.result.served_by_instance == "late"
        weighted = await pool.admin.SetInstanceWeight(
            pool_pb2.SetInstanceWeightRequest(id="late", weight=5), metadata=ROOT
        )
        assert weighted.instance.config.weight == 5


async def test_models_are_loaded_by_hand_only_where_the_pool_loads_them(make_pool: Any) -> None:
    """LoadModel and UnloadModel act on an Ollama; an OpenAI-compatible server loads its own
    models, so there they are refused (they did nothing and answered OK). A preload or a
    memory budget there is refused at registration, naming the field."""
    async with EmulatorFleet([fast_emulator_config()]) as fleet, make_pool(fleet.urls) as pool:
        served = pool_pb2.InstanceConfig(
            id="vllm", base_url=f"{fleet.urls[0]}/v1", kind=pool_pb2.INSTANCE_KIND_OPENAI
        )
        await pool.admin.RegisterInstance(
            pool_pb2.RegisterInstanceRequest(config=served), metadata=ROOT
        )
        loaded = await pool.admin.LoadModel(
            pool_pb2.LoadModelRequest(id="ollama-0", model=MODEL), metadata=ROOT
        )
        assert MODEL in [m.name for m in loaded.instance.loaded]
        for call in (
            pool.admin.LoadModel(pool_pb2.LoadModelRequest(id="vllm", model=MODEL), metadata=ROOT),
            pool.admin.UnloadModel(
                pool_pb2.UnloadModelRequest(id="vllm", model=MODEL), metadata=ROOT
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "OpenAI-compatible" in (info.value.details() or "")
        with_preload, with_budget = pool_pb2.InstanceConfig(), pool_pb2.InstanceConfig()
        for refused in (with_preload, with_budget):
            refused.CopyFrom(served)
            refused.id = "vllm-2"
        with_preload.preload.append(MODEL)
        with_budget.memory_budget_bytes = 2**33
        for refused, field in ((with_preload, "preload"), (with_budget, "memory_budget")):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pool.admin.RegisterInstance(
                    pool_pb2.RegisterInstanceRequest(config=refused), metadata=ROOT
                )
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in (info.value.details() or "")


async def test_a_model_loaded_by_hand_stays_loaded_for_its_keep_alive(
    make_pool: Any, redis_client: aioredis.Redis
) -> None:
    """LoadModel's keep_alive holds the model loaded at least that long, on every replica:
    placement keeps it as a preload, and a call to it asks the server for no less (Usher's
    own keep_alive replaced it before). UnloadModel lets it go; a keep_alive of 0 is refused."""
    ten_days = 10 * 86_400
    async with EmulatorFleet([fast_emulator_config()]) as fleet, make_pool(fleet.urls) as pool:
        load = pool_pb2.LoadModelRequest(id="ollama-0", model=MODEL)
        load.keep_alive.FromSeconds(ten_days)
        await pool.admin.LoadModel(load, metadata=ROOT)
        assert await redis_client.hget(keys.POOL_HELD, f"ollama-0/{MODEL}") is not None
        await pool.app.registry.sync_shared()  # as another replica reads it
        instance = pool.app.registry.instances["ollama-0"]
        assert MODEL in instance.view().preload
        await run(pool)
        await pool.app.registry.check(instance)
        expires = instance.loaded[MODEL].expires_at
        assert expires is not None and expires.timestamp() > time.time() + ten_days - 60

        await pool.admin.UnloadModel(
            pool_pb2.UnloadModelRequest(id="ollama-0", model=MODEL), metadata=ROOT
        )
        assert await redis_client.hget(keys.POOL_HELD, f"ollama-0/{MODEL}") is None
        assert MODEL not in instance.view().preload
        load.keep_alive.FromSeconds(0)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pool.admin.LoadModel(load, metadata=ROOT)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "keep_alive" in (info.value.details() or "")


async def test_a_stored_registration_the_rules_now_refuse_leaves_the_others_be(
    make_pool: Any, redis_client: aioredis.Redis
) -> None:
    """A registration accepted before a rule tightened (here an OpenAI-compatible server
    with a preload) is logged and passed over; the other registrations are picked up."""
    async with (
        EmulatorFleet([fast_emulator_config(), fast_emulator_config()]) as fleet,
        make_pool(fleet.urls[:1]) as pool,
    ):
        old = pool_pb2.InstanceConfig(
            id="old", base_url=f"{fleet.urls[1]}/v1", kind=pool_pb2.INSTANCE_KIND_OPENAI
        )
        old.preload.append(MODEL)
        late = pool_pb2.InstanceConfig(
            id="late", base_url=fleet.urls[1], kind=pool_pb2.INSTANCE_KIND_OLLAMA
        )
        await redis_client.hset(
            keys.POOL_INSTANCES,
            mapping={"old": old.SerializeToString(), "late": late.SerializeToString()},
        )
        await pool.app.registry.sync_shared()
        assert sorted(pool.app.registry.instances) == ["late", "ollama-0"]


def test_bad_instance_config_is_a_clear_error_at_start() -> None:
    env = {
        **os.environ,
        "USHER_INSTANCES": "gpu1=http://h:11434;weight=-2",
        "USHER_API_TOKENS": TOKENS,
    }
    env.pop("USHER_POOL_CONFIG", None)
    done = subprocess.run(
        [sys.executable, "-m", "services.pool"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "bad configuration" in done.stderr and "weight" in done.stderr and "gpu1" in done.stderr


async def test_placement_never_evicts_a_model_that_is_running(
    make_pool: Any, redis_client: aioredis.Redis
) -> None:
    async with room_for_one_of_two(make_pool) as pool:
        await run(pool, "llama3.2:1b")
        held = await reserve(pool, "llama3.2:1b")  # a request is running on it now
        await redis_client.sadd(keys.MODELS, "qwen2.5:0.5b")
        await redis_client.zadd(ModelKeys("qwen2.5:0.5b").queue, {"0000000000000001:X": 1})
        state = pool.app.registry.instances["ollama-0"]
        state.last_used["llama3.2:1b"] = time.time() - 60
        assert await place_once(pool.app.registry, pool.app.slots) == []
        assert set(state.loaded) == {"llama3.2:1b"}
        await pool.stub.Release(pool_pb2.ReleaseRequest(slot_id=held.id), metadata=SVC)
        actions = await place_once(pool.app.registry, pool.app.slots)
        assert [a.kind for a in actions] == ["unload", "load"]


async def test_a_half_open_circuit_admits_exactly_its_trial_calls(make_pool: Any) -> None:
    config = fast_emulator_config(num_parallel=8)
    async with (
        EmulatorFleet([config]) as fleet,
        make_pool(
            fleet.urls, parallel=8, circuit_half_open_max_calls=2, circuit_open_seconds=0.5
        ) as pool,
    ):
        fleet[0].set_faults(fail_next=3, fail_status=500)
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError):
                await run(pool)
        await asyncio.sleep(0.6)  # open period over: half-open
        # Trial calls stall in the model server, so they stay in flight.
        fleet[0].set_faults(hang_after_tokens=1)
        received = fleet[0].stats.requests_received

        async def try_reserve() -> pool_pb2.Slot | None:
            request = pool_pb2.ReserveRequest(models=[MODEL], holder="test")
            request.wait.FromMilliseconds(300)
            reply = await pool.stub.Reserve(request, metadata=SVC)
            return reply.slot if reply.HasField("slot") else None

        slots = [s for s in await asyncio.gather(*(try_reserve() for _ in range(6))) if s]
        assert len(slots) == 2
        calls = [pool.stub.Generate(generate_request(s), metadata=SVC) for s in slots]
        firsts = [await call.read() for call in calls]  # both trials reached the server
        assert all(f.WhichOneof("event") == "started" for f in firsts)
        assert await try_reserve() is None, "a third call got through while trials ran"
        fleet[0].set_faults(hang_after_tokens=None)
        for call in calls:
            while await call.read() != grpc.aio.EOF:
                pass
        assert fleet[0].stats.requests_received - received == 2
        # A trial succeeded: the circuit is closed and every caller gets through again.
        more = [s for s in await asyncio.gather(*(try_reserve() for _ in range(4))) if s]
        assert len(more) == 4
        for slot in more:
            await pool.stub.Release(pool_pb2.ReleaseRequest(slot_id=slot.id), metadata=SVC)


async def test_a_trial_slot_released_unused_frees_the_trial(make_pool: Any) -> None:
    async with (
        EmulatorFleet([fast_emulator_config()]) as fleet,
        make_pool(fleet.urls, circuit_half_open_max_calls=1, circuit_open_seconds=0.3) as pool,
    ):
        fleet[0].set_faults(fail_next=3, fail_status=500)
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError):
                await run(pool)
        await asyncio.sleep(0.4)
        slot = await reserve(pool, wait=0.5)
        await pool.stub.Release(pool_pb2.ReleaseRequest(slot_id=slot.id), metadata=SVC)
        events = await run(pool)  # the trial is free again, and it succeeds
        assert events[-1].HasField("done")


async def test_health_takes_an_instance_out_after_the_threshold_and_back_on_recovery(
    make_pool: Any,
) -> None:
    async with (
        EmulatorFleet([fast_emulator_config()]) as fleet,
        make_pool(fleet.urls, unhealthy_after_failures=3, health_interval_seconds=3600) as pool,
    ):
        registry = pool.app.registry
        state = registry.instances["ollama-0"]

        async def health() -> int:
            listed = await pool.stub.ListInstances(pool_pb2.ListInstancesRequest(), metadata=SVC)
            return int(listed.instances[0].health)

        assert await health() == pool_pb2.INSTANCE_HEALTH_HEALTHY
        await asyncio.sleep(0.3)  # the health loop's first pass (at start) is over
        await fleet[0].crash()
        for _ in range(2):
            await registry.check(state)
            assert await health() == pool_pb2.INSTANCE_HEALTH_HEALTHY
        await registry.check(state)
        assert await health() == pool_pb2.INSTANCE_HEALTH_UNHEALTHY
        await fleet[0].restart()
        await registry.check(state)
        assert await health() == pool_pb2.INSTANCE_HEALTH_HEALTHY


async def test_a_caller_of_the_result_alone_gets_one_message(make_pool: Any) -> None:
    async with EmulatorFleet([fast_emulator_config()]) as fleet, make_pool(fleet.urls) as pool:
        request = generate_request(await reserve(pool))
        request.stream = False
        events = [e async for e in pool.stub.Generate(request, metadata=SVC)]
        assert [e.WhichOneof("event") for e in events] == ["done"]
        assert events[0].done.result.text and events[0].done.result.served_by_instance


async def test_a_whole_answer_in_one_unary_call_frees_its_slot(
    make_pool: Any, redis_client: aioredis.Redis
) -> None:
    async with EmulatorFleet([fast_emulator_config()]) as fleet, make_pool(fleet.urls) as pool:
        request = generate_request(await reserve(pool))
        reply = await pool.stub.GenerateWhole(
            pool_pb2.GenerateWholeRequest(request=request), metadata=SVC
        )
        assert reply.done.result.text and reply.done.result.served_by_instance
        assert reply.done.usage.completion_tokens > 0
        assert await slots_held(redis_client) == 0
        # Its slot is gone: refused as Generate refuses it.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pool.stub.GenerateWhole(
                pool_pb2.GenerateWholeRequest(request=request), metadata=SVC
            )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def slots_held(redis_client: aioredis.Redis, model: str = MODEL) -> int:
    held = 0
    for instance in ("ollama-0",):
        held += int(await redis_client.zcard(keys.InstanceKeys(instance).model_slots(model)))
    return held


@contextlib.asynccontextmanager
async def one_slot_kept_after_an_answer(
    make_pool: Any,
) -> AsyncIterator[tuple[RunningPool, pool_pb2.Slot]]:
    """A Pool whose one instance has one slot for all its models (two 1 GiB models), and
    that slot kept after an answer with keep_slot."""
    small = [model_spec("llama3.2:1b@1GiB"), model_spec("qwen2.5:0.5b@1GiB")]
    async with (
        EmulatorFleet([fast_emulator_config(models=small)]) as fleet,
        make_pool(fleet.urls, parallel=1) as pool,
    ):
        for state in pool.app.registry.instances.values():
            state.spec = state.spec.replace(max_loaded_models=1)
        slot = await reserve(pool)
        request = generate_request(slot)
        request.keep_slot = True
        events = [e async for e in pool.stub.Generate(request, metadata=SVC)]
        assert events[-1].done.slot_kept
        yield pool, slot


async def test_a_kept_slot_runs_the_next_request_of_its_model_and_makes_way_for_others(
    make_pool: Any, redis_client: aioredis.Redis
) -> None:
    async with one_slot_kept_after_an_answer(make_pool) as (pool, slot):
        assert await slots_held(redis_client) == 1  # still held, for the next request

        # Reserved again with it: the same slot, at once (parallel=1: no other is free).
        again = pool_pb2.ReserveRequest(models=[MODEL], holder="test", reuse_slot_id=slot.id)
        again.wait.FromMilliseconds(0)
        reply = await pool.stub.Reserve(again, metadata=SVC)
        assert reply.slot.id == slot.id
        request = generate_request(reply.slot)
        request.keep_slot = True
        events = [e async for e in pool.stub.Generate(request, metadata=SVC)]
        assert events[-1].done.slot_kept

        # Another model waits for the instance's one slot: the kept one makes way for it.
        other = asyncio.ensure_future(reserve(pool, "qwen2.5:0.5b", wait=2.0))
        granted = await other
        assert granted.model == "qwen2.5:0.5b"
        assert await slots_held(redis_client) == 0
        # Its holder asks for it again: it is gone, and a slot is reserved as usual.
        again = pool_pb2.ReserveRequest(models=[MODEL], holder="test", reuse_slot_id=slot.id)
        again.wait.FromMilliseconds(0)
        reply = await pool.stub.Reserve(again, metadata=SVC)
        assert reply.slot.id != slot.id
        for held in (granted, reply.slot):
            if held.id:
                await pool.stub.Release(pool_pb2.ReleaseRequest(slot_id=held.id), metadata=SVC)


async def test_a_kept_slot_released_by_its_holder_is_free(
    make_pool: Any, redis_client: aioredis.Redis
) -> None:
    async with EmulatorFleet([fast_emulator_config()]) as fleet, make_pool(fleet.urls) as pool:
        slot = await reserve(pool)
        request = generate_request(slot)
        request.keep_slot = True
        events = [e async for e in pool.stub.Generate(request, metadata=SVC)]
        assert events[-1].done.slot_kept
        await pool.stub.Release(pool_pb2.ReleaseRequest(slot_id=slot.id), metadata=SVC)
        assert await slots_held(redis_client) == 0
        # Without keep_slot the answer frees it, as before.
        events = await run(pool)
        assert not events[-1].done.slot_kept
        assert await slots_held(redis_client) == 0


async def test_a_generate_runs_on_its_kept_slot_with_no_reserve_or_on_a_new_one(
    make_pool: Any, redis_client: aioredis.Redis
) -> None:
    async with one_slot_kept_after_an_answer(make_pool) as (pool, slot):
        # Run on it again straight away (parallel=1: it is the instance's one slot), and
        # kept again.
        request = generate_request(slot)
        request.keep_slot = request.reuse_kept_slot = True
        events = [e async for e in pool.stub.Generate(request, metadata=SVC)]
        assert events[-1].done.result.text and events[-1].done.slot_kept
        assert await slots_held(redis_client) == 1

        # Another model took the instance's slot meanwhile: the kept one went to it, so
        # the request waits for a slot reserved for it (freed when the other is done);
        # that one is not kept (its id is not the one its caller holds).
        other = await reserve(pool, "qwen2.5:0.5b", wait=2.0)
        assert await slots_held(redis_client) == 0
        request = generate_request(slot)
        request.keep_slot = request.reuse_kept_slot = True
        running = asyncio.ensure_future(
            _collect(pool.stub.Generate(request, metadata=SVC, timeout=5))
        )
        await asyncio.sleep(0.2)
        assert not running.done()  # waiting for the instance's one slot
        await pool.stub.Release(pool_pb2.ReleaseRequest(slot_id=other.id), metadata=SVC)
        events = await running
        assert events[-1].done.result.text and not events[-1].done.slot_kept
        assert await slots_held(redis_client) == 0

        # None frees within the call's deadline: FAILED_PRECONDITION, nothing ran.
        other = await reserve(pool, "qwen2.5:0.5b", wait=2.0)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _collect(pool.stub.Generate(request, metadata=SVC, timeout=0.5))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        await pool.stub.Release(pool_pb2.ReleaseRequest(slot_id=other.id), metadata=SVC)


async def test_a_slot_kept_a_while_makes_way_for_a_reserve_of_its_model(
    make_pool: Any, redis_client: aioredis.Redis
) -> None:
    """Its dispatcher had no request for it (another Scheduler replica got the model's next
    one, and reserves here): the kept slot is given up to that Reserve within moments."""
    async with (
        EmulatorFleet([fast_emulator_config()]) as fleet,
        make_pool(fleet.urls[:1], parallel=1) as pool,
    ):
        slot = await reserve(pool)
        request = generate_request(slot)
        request.keep_slot = True
        events = [e async for e in pool.stub.Generate(request, metadata=SVC)]
        assert events[-1].done.slot_kept
        began = time.monotonic()
        granted = await reserve(pool, wait=2.0)
        assert granted.id != slot.id and time.monotonic() - began < 1.0
        await pool.stub.Release(pool_pb2.ReleaseRequest(slot_id=granted.id), metadata=SVC)


async def _collect(call: Any) -> list[pool_pb2.GenerateResponse]:
    return [e async for e in call]


def test_the_connections_to_a_model_server_follow_its_slots() -> None:
    def limit(**spec: Any) -> int:
        return connection_limit(InstanceSpec(id="a", base_url="http://127.0.0.1:1", **spec))

    assert limit(parallel=4) == MIN_CONNECTIONS
    assert limit(parallel=500) == 500 + CONTROL_CONNECTIONS
    assert limit(parallel=100, max_loaded_models=3) == 300 + CONTROL_CONNECTIONS


async def test_every_slot_of_a_wide_server_runs_at_once(make_pool: Any) -> None:
    """A server with more slots than the least number of connections (a vLLM's 300
    sequences, say): each slot's call gets its own connection at once; none waits for one
    to free (and fails over after the connect timeout), and the health checks still get
    theirs."""
    wide = MIN_CONNECTIONS + 44
    # Answers of a minute, cut short once every call has its first delta: the first call is
    # still running when the last starts, even where starting 300 streams takes a busy
    # machine several seconds (over 6 s in one CI run).
    config = fast_emulator_config(tokens_per_second=10, output_tokens=(600, 600), num_parallel=wide)
    async with EmulatorFleet([config]) as fleet, make_pool(fleet.urls, parallel=wide) as pool:
        slots = [await reserve(pool) for _ in range(wide)]
        # A call is held open until every call has its first delta: one closed sooner ends
        # its generation, and the count on the server would say nothing of the rest.
        all_started = asyncio.Barrier(wide)

        async def first_delta(slot: pool_pb2.Slot) -> str:
            request = generate_request(slot)
            async for event in pool.stub.Generate(request, metadata=SVC, timeout=30):
                if event.HasField("delta"):
                    await asyncio.wait_for(all_started.wait(), timeout=20)
                    return "delta"
            return "no output"

        outcomes = await asyncio.gather(*(first_delta(slot) for slot in slots))
        assert outcomes == ["delta"] * wide
        # All at once on the server (not the connections' number, then the rest).
        assert fleet[0].stats.models[MODEL].in_flight_max == wide


async def test_a_token_held_for_its_batch_goes_out_when_the_model_server_pauses(
    make_pool: Any,
) -> None:
    """Tokens go to the dispatcher batched (one message per COALESCE_SECONDS); the last
    ones before the model server pauses (here for good, after 3 tokens 1 ms apart) go out
    within a batch's time anyway, not with whatever comes after the pause."""
    config = fast_emulator_config(
        tokens_per_second=1000, output_tokens=(50, 50), faults=FaultConfig(hang_after_tokens=3)
    )
    async with EmulatorFleet([config]) as fleet, make_pool(fleet.urls) as pool:
        slot = await reserve(pool)
        seen: list[int] = []

        async def read() -> None:
            async for event in pool.stub.Generate(generate_request(slot), metadata=SVC):
                if event.HasField("delta"):
                    seen.append(event.delta.completion_tokens)

        reading = asyncio.create_task(read())
        try:
            for _ in range(50):
                if seen and seen[-1] == 3:
                    break
                await asyncio.sleep(0.01)
            assert seen and seen[-1] == 3, seen
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reading
