"""How many dispatch loops a replica runs: one for each slot of its fleet (one loop in
EXTERNAL_LOOP_EVERY runs the external provider's requests, the others the local fleet's),
following the fleet as the Pool lists it unless USHER_DISPATCH_CONCURRENCY fixes it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

import services.scheduler.dispatcher as dispatcher_module
from services.pool.settings import PoolSettings
from services.scheduler.dispatcher import Dispatcher, DispatchSettings
from services.scheduler.fleet import (
    DEFAULT_LOOPS,
    EXTERNAL_LOOP_EVERY,
    MAX_LOOPS,
    fleet_slots,
    loops_for_fleet,
    loops_for_slots,
)
from services.scheduler.quotas import Quotas
from services.scheduler.store import QueueStore
from tests.pool.conftest import fast_emulator_config
from tests.pool.test_pool_service import ROOT, RunningPool, running_pool, settings_for
from usher.emulator import EmulatorFleet
from usher.testing.processes import free_port
from usher.testing.redis_server import ExternalRedis, RedisServer
from usher.testing.stack import LocalStack, StackConfig
from usher.v1 import pool_pb2


def _split(loops: int) -> tuple[int, int]:
    external = sum(i % EXTERNAL_LOOP_EVERY == EXTERNAL_LOOP_EVERY - 1 for i in range(loops))
    return loops - external, external


@given(st.integers(0, 2000), st.integers(0, 200))
def test_the_fewest_loops_that_cover_every_slot(local: int, external: int) -> None:
    loops = loops_for_slots(local, external)
    has_local, has_external = _split(loops)
    assert has_local >= local and has_external >= external
    if loops:
        fewer_local, fewer_external = _split(loops - 1)
        assert fewer_local < local or fewer_external < external


def test_a_local_fleet_of_24_slots_needs_27_loops() -> None:
    assert loops_for_slots(24, 0) == 27
    assert loops_for_slots(0, 2) == 2 * EXTERNAL_LOOP_EVERY


def _status(
    parallel: int,
    *,
    max_loaded: int = 0,
    loaded: int = 0,
    external: bool = False,
    draining: bool = False,
) -> pool_pb2.InstanceStatus:
    status = pool_pb2.InstanceStatus(parallel=parallel, draining=draining)
    status.config.max_loaded_models = max_loaded
    status.config.external = external
    for n in range(loaded):
        status.loaded.add(name=f"model-{n}")
    return status


def test_the_fleets_slots_count_its_models_at_once() -> None:
    fleet = [
        _status(24),  # one model loaded or none: 24
        _status(4, max_loaded=3),  # 12, however many are loaded now
        _status(2, loaded=3),  # no bound: the 3 loaded now, 6
        _status(8, draining=True),  # takes no new work
        _status(5, external=True),
    ]
    assert fleet_slots(fleet) == (42, 5)
    assert loops_for_fleet(fleet) == loops_for_slots(42, 5) == 47


def test_the_loops_stay_between_the_default_and_the_bound() -> None:
    assert loops_for_fleet([]) == DEFAULT_LOOPS  # not listed yet
    assert loops_for_fleet([_status(2)]) == DEFAULT_LOOPS
    assert loops_for_fleet([_status(4096)]) == MAX_LOOPS


async def _until(check: object, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _running(
    settings: PoolSettings, redis_client: aioredis.Redis, pool: RunningPool, **dispatch: Any
) -> AsyncIterator[Dispatcher]:
    """A Dispatcher on ``pool`` with its loops running until the block ends."""
    loops = Dispatcher(
        QueueStore(redis_client),
        Quotas(redis_client),
        DispatchSettings(settings.listen, "svc-token", **dispatch),
        pool=pool.stub,
    )
    stop = asyncio.Event()
    running = asyncio.create_task(loops.run(stop))
    try:
        yield loops
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)
        await loops.aclose()
    assert not loops.loops_running


async def test_the_loops_follow_instances_registered_and_drained_at_run_time(
    redis_server: RedisServer | ExternalRedis,
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A replica following its fleet (concurrency unset) runs a loop for each slot of an
    instance registered at run time, and ends the extra loops once it is drained."""
    monkeypatch.setattr(dispatcher_module, "FLEET_REFRESH_SECONDS", 0.1)
    async with EmulatorFleet([fast_emulator_config(), fast_emulator_config()]) as fleet:
        settings = settings_for(redis_server.url, fleet.urls[:1])
        async with running_pool(settings) as pool, _running(settings, redis_client, pool) as loops:
            await _until(lambda: loops.loops_running == DEFAULT_LOOPS)
            wide = pool_pb2.InstanceConfig(
                id="wide", base_url=fleet.urls[1], kind=pool_pb2.INSTANCE_KIND_OLLAMA
            )
            wide.parallel = 40
            await pool.admin.RegisterInstance(
                pool_pb2.RegisterInstanceRequest(config=wide), metadata=ROOT
            )
            await _until(lambda: loops.loops_wanted == loops_for_slots(42, 0))
            assert loops.loops_running == loops_for_slots(42, 0)
            await pool.admin.DrainInstance(
                pool_pb2.DrainInstanceRequest(id="wide", drain=True), metadata=ROOT
            )
            await _until(lambda: loops.loops_wanted == DEFAULT_LOOPS)
            # The idle loops beyond it end at their next rest.
            await _until(lambda: loops.loops_running == DEFAULT_LOOPS)


async def test_a_set_concurrency_is_what_it_says_whatever_the_fleet(
    redis_server: RedisServer | ExternalRedis,
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dispatcher_module, "FLEET_REFRESH_SECONDS", 0.1)
    async with EmulatorFleet([fast_emulator_config()]) as fleet:
        settings = settings_for(redis_server.url, fleet.urls, parallel=40)
        async with (
            running_pool(settings) as pool,
            _running(settings, redis_client, pool, concurrency=3) as loops,
        ):
            await asyncio.sleep(0.5)  # five refreshes, were it following the fleet
            assert loops.loops_wanted == loops.loops_running == 3


@pytest.mark.parametrize("all_in_one", [True, False], ids=["serve", "trio"])
async def test_every_slot_of_the_fleet_runs_a_request_at_once(all_in_one: bool) -> None:
    """A model server of 24 slots and no USHER_DISPATCH_CONCURRENCY: 24 requests at once
    are all generating together (not the loops a replica would start with, 16), through
    ``usher serve`` and through the trio's Scheduler alike."""
    slots = 24
    config = StackConfig(
        all_in_one=all_in_one,
        emulator_args=(
            *("--tokens-per-second", "20", "--output-tokens", "20:20"),
            *("--ttft", "0", "--load-time", "0", "--parallel", str(slots)),
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


async def test_a_pool_not_up_yet_leaves_the_default_loops_running(
    redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trio Scheduler may start before its Pool: the fleet is asked for again, and the
    dispatcher runs on with its default loops meanwhile."""
    monkeypatch.setattr(dispatcher_module, "FLEET_RETRY_SECONDS", 0.05)
    loops = Dispatcher(
        QueueStore(redis_client),
        Quotas(redis_client),
        DispatchSettings(f"127.0.0.1:{free_port()}", "svc-token"),
    )
    stop = asyncio.Event()
    running = asyncio.create_task(loops.run(stop))
    try:
        await asyncio.sleep(0.5)  # several asks, none answered
        assert not running.done()
        assert loops.loops_wanted == loops.loops_running == DEFAULT_LOOPS
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)
        await loops.aclose()
