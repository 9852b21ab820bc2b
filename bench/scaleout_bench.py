"""Scale-out: the same stack with 1, 2 and 3 replicas of every kind (Scheduler, Pool,
Notifier, gateway) on one Redis, clients spread over the gateways and every internal
channel round robin over the replicas behind it. Reported per replica count: requests/s and
latency (closed loop through the gateways, emulator in zero-delay mode), Redis commands and
round trips per request (INFO commandstats and total_reads_processed: the bound a single
Redis primary puts on the whole cluster), and how evenly each kind's replicas shared their
calls. Then the cost of WAIT-acknowledged Submit on Sentinel (1 replica), and a chaos run on
a 3+3 Redis Cluster (a primary SIGKILLed among the other victims, WAIT on)."""

from __future__ import annotations

import re
import time
from dataclasses import replace
from typing import Any, cast

import aiohttp
import grpc
import httpx
import redis

from bench import plots
from bench.chaos import chaos_config, run_chaos
from bench.load import MODEL, USERS, Call, closed_loop, http_client, post_ok, prompt
from usher.testing.stack import LocalStack, StackConfig
from usher.v1 import request_pb2, scheduler_pb2, scheduler_pb2_grpc

__all__ = ["run"]

REPLICAS = (1, 2, 3)
CONCURRENCY = 32
SECONDS = 8.0
WAIT_CONCURRENCY = (1, 16)
WAIT_SECONDS = 4.0
CHAOS_REQUESTS = 300
_CALLS = re.compile(r'^usher_grpc_server_calls_total\{method="([^"]+)"\} ([0-9.e+]+)$', re.M)


def stack_config(replicas: int) -> StackConfig:
    return StackConfig(
        emulator_args=("--fleet", "2", "--instant", "--parallel", "64", "--output-tokens", "8:8"),
        instance_options=";parallel=64",
        scheduler_env={"USHER_DISPATCH_CONCURRENCY": "64", "USHER_QUEUE_MAX_SIZE": "100000"},
        redis_appendfsync="everysec",
        gateway=True,
        scheduler_replicas=replicas,
        notifier_replicas=replicas,
        pool_replicas=replicas,
        gateway_replicas=replicas,
        metrics=True,
    )


def over_gateways(client: aiohttp.ClientSession, urls: list[str]) -> Call:
    """Ollama's generate through the gateways, each worker sticking to one (as a client
    behind a load balancer would)."""

    async def call(worker: int, n: int) -> bool:
        url = urls[worker % len(urls)]
        headers = {"Authorization": f"Bearer {USERS[worker % len(USERS)]}-token"}
        body = {"model": MODEL, "prompt": prompt(worker, n), "stream": False}
        return await post_ok(client, f"{url}/api/generate", body, headers)

    return call


def redis_counters(client: redis.Redis) -> tuple[int, int]:
    """Commands and client reads (≈ round trips: a pipeline arrives in one read) so far."""
    commands = cast(dict[str, dict[str, Any]], client.info("commandstats"))
    stats = client.info("stats")
    return (
        sum(int(v["calls"]) for v in commands.values()),
        int(stats.get("total_reads_processed", 0)),
    )


async def calls_by_replica(stack: LocalStack) -> dict[str, float]:
    out: dict[str, float] = {}
    async with httpx.AsyncClient(timeout=5) as client:
        for name, url in stack.metrics_urls.items():
            text = (await client.get(url)).text
            out[name] = sum(float(count) for _method, count in _CALLS.findall(text))
    return out


def shares(before: dict[str, float], after: dict[str, float]) -> dict[str, dict[str, float]]:
    """Each replica's fraction of its kind's calls over the run."""
    calls: dict[str, dict[str, float]] = {}
    for name, count in after.items():
        calls.setdefault(name.split("-")[0], {})[name] = count - before.get(name, 0.0)
    return {
        kind: {name: n / max(1.0, sum(by.values())) for name, n in by.items()}
        for kind, by in calls.items()
    }


async def measure_replicas(replicas: int) -> dict[str, Any]:
    with LocalStack(stack_config(replicas)) as stack:
        counter = redis.Redis.from_url(stack.redis_url)
        async with http_client(CONCURRENCY) as http:
            call = over_gateways(http, stack.gateway_urls)
            await closed_loop(call, 8, 1.5)  # warm up
            calls_before = await calls_by_replica(stack)
            commands_before, reads_before = redis_counters(counter)
            load = await closed_loop(call, CONCURRENCY, SECONDS)
            commands_after, reads_after = redis_counters(counter)
            calls_after = await calls_by_replica(stack)
        counter.close()
    done = max(1, len(load.latencies))
    return {
        **load.figures(cpu=False),
        "redis_commands_per_request": (commands_after - commands_before) / done,
        "redis_round_trips_per_request": (reads_after - reads_before) / done,
        "call_shares": shares(calls_before, calls_after),
    }


def submit_call(stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub) -> Call:
    async def call(worker: int, n: int) -> bool:
        try:
            await stub.Submit(
                scheduler_pb2.SubmitRequest(
                    model=MODEL, generate=request_pb2.GenerateInput(prompt=prompt(worker, n))
                ),
                metadata=(("authorization", f"Bearer {USERS[worker % len(USERS)]}-token"),),
                timeout=30,
            )
        except grpc.aio.AioRpcError:
            return False
        return True

    return call


async def measure_wait_cost() -> dict[str, Any]:
    """Submit alone (no dispatching: the queue only grows) on Sentinel with 1 replica, with
    WAIT off and WAIT 1: requests/s and latency at each concurrency."""
    out: dict[str, Any] = {}
    for label, replicas in (("no_wait", "0"), ("wait_1_replica", "1")):
        config = replace(
            stack_config(1),
            redis_topology="sentinel",
            gateway=False,
            metrics=False,
            scheduler_env={
                "USHER_QUEUE_MAX_SIZE": "1000000",
                "USHER_REDIS_WAIT_REPLICAS": replicas,
                "USHER_TENANT_MAX_STORED_BYTES": "0",
            },
        )
        with LocalStack(config) as stack:
            async with grpc.aio.insecure_channel(stack.scheduler_address) as channel:
                call = submit_call(scheduler_pb2_grpc.SchedulerServiceStub(channel))
                await closed_loop(call, 4, 1.0)
                out[label] = {
                    f"c{c}": (await closed_loop(call, c, WAIT_SECONDS)).figures(cpu=False)
                    for c in WAIT_CONCURRENCY
                }
    for c in WAIT_CONCURRENCY:
        key = f"c{c}"
        out[f"wait_added_p50_ms_{key}"] = (
            out["wait_1_replica"][key]["p50_ms"] - out["no_wait"][key]["p50_ms"]
        )
        out[f"wait_rps_ratio_{key}"] = out["wait_1_replica"][key]["requests_per_second"] / max(
            1e-9, out["no_wait"][key]["requests_per_second"]
        )
    return out


async def cluster_chaos() -> dict[str, Any]:
    config = chaos_config(tokens_per_second=400, max_attempts=50)
    config = replace(
        config,
        redis_topology="cluster",
        scheduler_env={**config.scheduler_env, "USHER_REDIS_WAIT_REPLICAS": "1"},
    )
    started = time.monotonic()
    report = await run_chaos(
        CHAOS_REQUESTS,
        rate=20.0,
        victims=("scheduler", "pool", "notifier", "redis"),
        config=config,
        kill_each_at_least=1,
        pause=(1.0, 2.5),
        settle_timeout=240.0,
    )
    return {
        "requests_accepted": len(report.accepted),
        "requests_completed": report.completed,
        "lost": report.lost,
        "outcomes": dict(report.outcomes),
        "finished_other_than_once": len(report.not_finished_once),
        "duplicate_events_delivered": report.duplicates,
        "duplicate_events_sent_by_notifier": report.notifier_duplicates,
        "kills": dict(report.killed()),
        "recovery_max_s_by_victim": {v: max(rs) for v, rs in report.recoveries().items()},
        "run_seconds": time.monotonic() - started,
    }


async def run() -> dict[str, Any]:
    by_replicas = {n: await measure_replicas(n) for n in REPLICAS}
    saved: list[str] = []
    _plot(by_replicas, saved)
    return {
        **{f"replicas_{n}": figures for n, figures in by_replicas.items()},
        "wait_cost_sentinel": await measure_wait_cost(),
        "cluster_chaos": await cluster_chaos(),
        "note": (
            f"closed loop at c={CONCURRENCY} through the gateways (each worker on one), emulator "
            "zero-delay (8 tokens), every process on the same 2 cores: more replicas add "
            "processes, not cores, so requests/s shows the per-request cost and its shape, "
            "not a cluster's speed; round trips = Redis client reads (a pipeline is one), "
            "health checks and idle polling included; call_shares = each replica's part of "
            "its kind's gRPC calls (usher_grpc_server_calls_total)"
        ),
        "plots": saved,
    }


def _plot(by_replicas: dict[int, dict[str, Any]], saved: list[str]) -> None:
    labels = [f"{n} each" for n in by_replicas]
    with plots.figure(
        "scaleout",
        1,
        2,
        size=(12, 4.5),
        title="Scale-out: replicas of every kind on one Redis",
        saved=saved,
    ) as (rps, redis_axis):
        plots.bars(
            rps,
            labels,
            {"requests/s": [f["requests_per_second"] for f in by_replicas.values()]},
            ylabel="requests/s",
            title=f"throughput, c={CONCURRENCY}",
            fmt="{:.0f}",
        )
        plots.bars(
            redis_axis,
            labels,
            {
                "commands": [f["redis_commands_per_request"] for f in by_replicas.values()],
                "round trips": [f["redis_round_trips_per_request"] for f in by_replicas.values()],
            },
            ylabel="per request",
            title="Redis work per request",
            fmt="{:.0f}",
        )
