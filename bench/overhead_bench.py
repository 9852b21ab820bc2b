"""Overhead: what Usher costs on top of the model server. Stacks side by side, each with
its own Redis and an emulated fleet in zero-delay mode (8 tokens per answer): the trio (each
service its own process, and the HTTP gateway), ``usher serve`` (all four in one process)
and the anchor's trio. Ways in, interleaved at concurrency 1 and 32:

* **direct**: Ollama's ``POST /api/generate`` (stream false) to the emulator itself;
* **trio**: gRPC Submit (result only, awaiting its result), then AwaitResult on the
  Notifier unless the Submit answered with the end (as the SDK's submit_and_wait);
* **gateway**: the same Ollama call to the trio's HTTP gateway (gateway → Scheduler → Pool
  → emulator, the answer back with the Submit, or through the Notifier);
* **serve**: the same Ollama call to ``usher serve``'s gateway (the same path in process);
* **serve_openai**: OpenAI's ``POST /v1/chat/completions`` to ``usher serve``'s gateway;
* **direct_stream**, **gateway_stream**, **serve_stream**: the same OpenAI call with
  ``stream: true`` (server-sent events read to the end, as a chat page reads them) to the
  emulator itself, to the trio's gateway and to ``usher serve`` (a streamed answer goes
  through the Notifier's Watch, not the Submit's answer);
* **anchor_trio**, **anchor_gateway**: the trio and gateway paths through the services as
  they were before issue 17 (``USHER_BENCH_ANCHOR``, a commit: ``2e6197e`` unless set; empty
  leaves them out), run from a throwaway git worktree of that commit beside this tree's
  stacks and driven by the same load generator, so the ratios issue 17 names come from one
  run;
* **litellm**, **herd** (and **litellm_stream**, **herd_stream**): the same OpenAI call
  through the peers (``bench/peers.py``: LiteLLM's proxy with one worker, ollama-herd's
  router and node agent), each at a pinned version in its own venv; a peer that cannot be
  installed or started is reported with the reason.

Reported per path and concurrency: requests/s, p50/p95/p99 latency, and CPU ms per request of
every process; the ratios to direct and the latency added (a streamed path's to
direct_stream). Every process shares the
machine's cores, so throughput is bounded by the CPU each request costs in all of them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import redis

from bench import peers, plots
from bench.load import (
    MODEL,
    Call,
    Load,
    Trio,
    closed_loop,
    http_chat,
    http_client,
    http_generate,
    stack_pids,
)
from bench.stats import goal
from usher.testing.stack import LocalStack, StackConfig

PATHS = (
    "direct",
    "anchor_trio",
    "trio",
    "anchor_gateway",
    "gateway",
    "serve",
    "serve_openai",
    "direct_stream",
    "gateway_stream",
    "serve_stream",
)
#: Issue 17's anchor: main before its work (USHER_BENCH_ANCHOR; empty: none).
ANCHOR = os.environ.get("USHER_BENCH_ANCHOR", "2e6197e")
#: Issue 17: the trio (gRPC and through its gateway) at 1.5 times the anchor's c=32 throughput.
GOAL_OVER_ANCHOR = 1.5
CONCURRENCY = (1, 32)
#: Seconds of measurement per (path, concurrency): the direct path is steady sooner.
#: (The anchor's paths take their own path's: ``anchor_trio`` the trio's.)
#: (A streamed path takes as long as its whole counterpart.)
SECONDS = {
    concurrency: {
        **by_path,
        "direct_stream": by_path["direct"],
        "gateway_stream": by_path["gateway"],
        "serve_stream": by_path["serve"],
    }
    for concurrency, by_path in {
        1: {"direct": 3.0, "trio": 5.0, "gateway": 5.0, "serve": 5.0, "serve_openai": 5.0},
        32: {"direct": 4.0, "trio": 8.0, "gateway": 8.0, "serve": 8.0, "serve_openai": 8.0},
    }.items()
}
GOAL_REQUESTS_PER_SECOND = 1000.0
GOAL_ADDED_P50_MS = 3.0
#: Issue 17: usher serve adds no more than ollama-herd (~2 ms at c=1) and spends ≤ 3 ms of
#: CPU per request; the trio (with its gateway) ≤ 5 ms.
GOAL_SERVE_ADDED_P50_MS = 2.0
GOAL_SERVE_CPU_MS = 3.0
GOAL_TRIO_CPU_MS = 5.0
#: Processes that are not Usher (their CPU is reported, not counted as Usher's).
NOT_USHER = frozenset({"client", "emulator", "redis"})


def _usher_cpu_ms(figures: dict[str, Any]) -> float:
    """CPU ms per request of Usher's own processes (Redis, the model server and the load
    generator apart)."""
    return float(sum(v for k, v in figures["cpu_ms_per_request"].items() if k not in NOT_USHER))


def stack_config(all_in_one: bool = False) -> StackConfig:
    return StackConfig(
        all_in_one=all_in_one,
        emulator_args=("--fleet", "2", "--instant", "--parallel", "64", "--output-tokens", "8:8"),
        instance_options=";parallel=64",
        scheduler_env={"USHER_DISPATCH_CONCURRENCY": "64", "USHER_QUEUE_MAX_SIZE": "100000"},
        redis_appendfsync="everysec",
        gateway=True,
    )


def _redis_calls(client: redis.Redis) -> dict[str, int]:
    stats = cast(dict[str, dict[str, Any]], client.info("commandstats"))
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def redis_work_per_request(
    before: dict[str, int], after: dict[str, int], requests: int
) -> dict[str, float]:
    """Redis commands per request over a run (scripts count once, as EVALSHA)."""
    spent = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    done = max(1, requests)
    return {
        "commands": sum(spent.values()) / done,
        "script_calls": (spent.get("evalsha", 0) + spent.get("eval", 0)) / done,
        "stream_reads": (spent.get("xread", 0) + spent.get("xrange", 0)) / done,
    }


async def measure() -> tuple[
    dict[int, dict[str, Load]], dict[str, dict[str, float]], dict[str, str]
]:
    """Every path at every concurrency, and Redis's work per request of each path through
    Usher at the highest concurrency."""
    loads: dict[int, dict[str, Load]] = {c: {} for c in CONCURRENCY}
    redis_work: dict[str, dict[str, float]] = {}
    unavailable: dict[str, str] = {}
    with contextlib.ExitStack() as running:
        stack = running.enter_context(LocalStack(stack_config()))
        serve = running.enter_context(LocalStack(stack_config(True)))
        anchor = None
        try:
            if not ANCHOR:
                raise OSError("USHER_BENCH_ANCHOR is empty")
            tree = running.enter_context(worktree(ANCHOR))
            anchor = running.enter_context(LocalStack(replace(stack_config(), source_dir=tree)))
        except (OSError, RuntimeError, TimeoutError, subprocess.SubprocessError) as exc:
            unavailable["anchor"] = str(exc)
        stacks = [s for s in (stack, serve, anchor) if s is not None]
        counters = {s: redis.Redis.from_url(s.redis_url) for s in stacks}
        pids = {s: stack_pids(s) for s in stacks}
        trios = {s: Trio(s) for s in (stack, anchor) if s is not None}
        async with http_client(max(CONCURRENCY)) as http:
            calls: dict[str, tuple[LocalStack, Call]] = {
                "direct": (stack, http_generate(http, stack.model_urls[0], with_token=False)),
                "trio": (stack, trios[stack]),
                "gateway": (stack, http_generate(http, stack.gateway_url, with_token=True)),
                "serve": (serve, http_generate(http, serve.gateway_url, with_token=True)),
                "serve_openai": (serve, http_chat(http, serve.gateway_url, with_token=True)),
                "direct_stream": (
                    stack,
                    http_chat(http, stack.model_urls[0], with_token=False, stream=True),
                ),
                "gateway_stream": (
                    stack,
                    http_chat(http, stack.gateway_url, with_token=True, stream=True),
                ),
                "serve_stream": (
                    serve,
                    http_chat(http, serve.gateway_url, with_token=True, stream=True),
                ),
            }
            if anchor is not None:
                calls["anchor_trio"] = (anchor, trios[anchor])
                calls["anchor_gateway"] = (
                    anchor,
                    http_generate(http, anchor.gateway_url, with_token=True),
                )
            # Warm up: connections, script caches, the model load, the averages.
            for _, call in calls.values():
                await closed_loop(call, 8, 1.5)
            for concurrency in CONCURRENCY:
                for path in [p for p in PATHS if p in calls]:
                    owner, call = calls[path]
                    before = _redis_calls(counters[owner])
                    seconds = SECONDS[concurrency][path.removeprefix("anchor_")]
                    loads[concurrency][path] = await closed_loop(
                        call, concurrency, seconds, pids[owner]
                    )
                    if not path.startswith("direct") and concurrency == max(CONCURRENCY):
                        redis_work[path] = redis_work_per_request(
                            before,
                            _redis_calls(counters[owner]),
                            len(loads[concurrency][path].latencies),
                        )
        for trio in trios.values():
            await trio.aclose()
        for counter in counters.values():
            counter.close()
        unavailable.update(await measure_peers(stack.model_urls[0], loads))
    return loads, redis_work, unavailable


@contextlib.contextmanager
def worktree(commit: str) -> Iterator[str]:
    """A throwaway git worktree of this repository at ``commit`` (removed afterwards)."""
    root = subprocess.run(
        ["git", "-C", str(Path(__file__).parent), "rev-parse", "--show-toplevel"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    path = tempfile.mkdtemp(prefix="usher-anchor-")
    made = subprocess.run(
        ["git", "-C", root, "worktree", "add", "--detach", path, commit],
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        raise OSError(f"no worktree of {commit}: {made.stderr.strip()[:200]}")
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", root, "worktree", "remove", "--force", path], check=False)


async def measure_peers(upstream: str, loads: dict[int, dict[str, Load]]) -> dict[str, str]:
    """Each peer at every concurrency (into ``loads``); the reason for each one missing."""
    unavailable: dict[str, str] = {}
    failures = (peers.PeerUnavailable, OSError, subprocess.SubprocessError)
    try:
        with peers.litellm(upstream, MODEL) as (url, key, pids):
            async with http_client(max(CONCURRENCY)) as http:
                calls = {
                    name: http_chat(http, url, with_token=False, api_key=key, stream=stream)
                    for name, stream in (("litellm", False), ("litellm_stream", True))
                }
                for call in calls.values():
                    await closed_loop(call, 8, 1.5)  # warm up
                for concurrency in CONCURRENCY:
                    seconds = SECONDS[concurrency]["serve"]
                    for name, call in calls.items():
                        loads[concurrency][name] = await closed_loop(
                            call, concurrency, seconds, pids
                        )
    except failures as exc:
        unavailable["litellm"] = str(exc)
    try:
        with peers.herd() as (namespace, url, pids):
            for concurrency in CONCURRENCY:
                for name, stream in (("herd", False), ("herd_stream", True)):
                    loads[concurrency][name] = await asyncio.to_thread(
                        peers.load_in_namespace,
                        namespace,
                        url,
                        concurrency,
                        SECONDS[concurrency]["serve"],
                        pids,
                        stream,
                    )
    except failures as exc:
        unavailable["herd"] = str(exc)
    return unavailable


def summarize(
    loads: dict[int, dict[str, Load]],
    redis_work: dict[str, dict[str, float]],
    unavailable: dict[str, str] | None = None,
) -> dict[str, Any]:
    summary: dict[str, Any] = {
        f"{path}_redis_per_request": work for path, work in redis_work.items()
    }
    summary["peers_unavailable"] = dict(unavailable or {})
    for concurrency, by_path in loads.items():
        figures = {path: load.figures() for path, load in by_path.items()}
        section: dict[str, Any] = dict(figures)
        for path in [p for p in by_path if not p.startswith("direct")]:
            # A streamed answer beside the model server's own streamed answer.
            base = "direct_stream" if path.endswith("_stream") else "direct"
            direct = figures.get(base, figures["direct"])
            section[f"{path}_over_direct_rps"] = (
                figures[path]["requests_per_second"] / direct["requests_per_second"]
            )
            section[f"{path}_added_ms"] = {
                q: figures[path][f"{q}_ms"] - direct[f"{q}_ms"] for q in ("p50", "p95", "p99")
            }
        summary[f"c{concurrency}"] = section
    top, one = f"c{max(CONCURRENCY)}", f"c{min(CONCURRENCY)}"
    summary["goals"] = {
        f"trio_requests_per_second_{top}": goal(
            summary[top]["trio"]["requests_per_second"], GOAL_REQUESTS_PER_SECOND, at_most=False
        ),
        f"gateway_requests_per_second_{top}": goal(
            summary[top]["gateway"]["requests_per_second"], GOAL_REQUESTS_PER_SECOND, at_most=False
        ),
        f"trio_added_p50_ms_{one}": goal(
            summary[one]["trio_added_ms"]["p50"], GOAL_ADDED_P50_MS, at_most=True
        ),
        f"gateway_added_p50_ms_{one}": goal(
            summary[one]["gateway_added_ms"]["p50"], GOAL_ADDED_P50_MS, at_most=True
        ),
        f"serve_added_p50_ms_{one}": goal(
            summary[one]["serve_added_ms"]["p50"], GOAL_SERVE_ADDED_P50_MS, at_most=True
        ),
        f"serve_cpu_ms_per_request_{top}": goal(
            _usher_cpu_ms(summary[top]["serve"]), GOAL_SERVE_CPU_MS, at_most=True
        ),
        f"trio_cpu_ms_per_request_{top}": goal(
            _usher_cpu_ms(summary[top]["gateway"]), GOAL_TRIO_CPU_MS, at_most=True
        ),
    }
    for path in ("trio", "gateway"):
        if f"anchor_{path}" in summary[top]:
            summary[f"{path}_over_anchor_rps_{top}"] = (
                summary[top][path]["requests_per_second"]
                / summary[top][f"anchor_{path}"]["requests_per_second"]
            )
            summary["goals"][f"{path}_over_anchor_rps_{top}"] = goal(
                summary[f"{path}_over_anchor_rps_{top}"], GOAL_OVER_ANCHOR, at_most=False
            )
    if "herd" in summary[top] and "herd" in summary[one]:
        # Issue 17: all in one, added p50 at c=1 no more than herd's, c=32 throughput as high.
        summary["goals"][f"serve_added_p50_ms_{one}_vs_herd"] = goal(
            summary[one]["serve_openai_added_ms"]["p50"],
            summary[one]["herd_added_ms"]["p50"],
            at_most=True,
        )
        summary["goals"][f"serve_requests_per_second_{top}_vs_herd"] = goal(
            summary[top]["serve_openai"]["requests_per_second"],
            summary[top]["herd"]["requests_per_second"],
            at_most=False,
        )
    # Streamed answers (as chat pages ask for them), through Usher and the peers side by
    # side: the latency added at c=1 over the model server's own stream, and the proxy's
    # throughput and CPU at c=32.
    summary["streamed"] = {
        path: {
            f"added_p50_ms_{one}": summary[one][f"{path}_added_ms"]["p50"],
            f"requests_per_second_{top}": summary[top][path]["requests_per_second"],
            f"proxy_cpu_ms_per_request_{top}": _usher_cpu_ms(summary[top][path]),
        }
        for path in ("serve_stream", "gateway_stream", "herd_stream", "litellm_stream")
        if path in summary[one] and path in summary[top]
    }
    summary["note"] = (
        "closed loop, emulator in zero-delay mode (8 tokens); cpu_ms_per_request counts every "
        "process of the stack and this client, all on the same cores; at c=32 the direct path "
        "is bounded by this client's own CPU (aiohttp), so added tail latency can come out "
        "negative there"
    )
    return summary


def plot(loads: dict[int, dict[str, Load]], saved: list[str]) -> None:
    """Per concurrency (a row each): requests/s, p50/p99 latency, CPU ms per request."""
    with plots.figure(
        "overhead",
        len(CONCURRENCY),
        3,
        size=(20, 4.5 * len(CONCURRENCY)),
        title="Usher's overhead: the model server directly vs through the trio, its gateway, "
        "and usher serve",
        saved=saved,
    ) as axes:
        for row, concurrency in enumerate(CONCURRENCY):
            by_path = loads[concurrency]
            paths = list(by_path)
            rps, latency, cpu = axes[3 * row : 3 * row + 3]
            plots.bars(
                rps,
                paths,
                {"requests/s": [by_path[p].requests_per_second for p in paths]},
                ylabel="requests/s",
                title=f"throughput, concurrency {concurrency}",
                fmt="{:.0f}",
            )
            figures = {p: by_path[p].figures(cpu=False) for p in paths}
            plots.bars(
                latency,
                paths,
                {q: [figures[p][f"{q}_ms"] for p in paths] for q in ("p50", "p99")},
                ylabel="latency (ms)",
                title=f"latency, concurrency {concurrency}",
                fmt="{:.1f}",
            )
            processes = sorted({name for p in paths for name in by_path[p].cpu})
            bottom = [0.0] * len(paths)
            for name in processes:
                per_request = [
                    by_path[p].cpu.get(name, 0.0) * 1000 / max(1, len(by_path[p].latencies))
                    for p in paths
                ]
                cpu.bar(paths, per_request, 0.6, bottom=bottom, label=name)
                bottom = [b + v for b, v in zip(bottom, per_request, strict=True)]
            for x, total in enumerate(bottom):
                cpu.annotate(f"{total:.2f}", (x, total), ha="center", va="bottom", fontsize=8)
            cpu.set_ylabel("CPU ms per request")
            cpu.set_title(f"CPU per request by process, concurrency {concurrency}")
            cpu.legend(fontsize=7, ncols=2)


async def run() -> dict[str, Any]:
    loads, redis_work, unavailable = await measure()
    summary = summarize(loads, redis_work, unavailable)
    saved: list[str] = []
    plot(loads, saved)
    summary["plots"] = saved
    return summary
