"""Where the Scheduler, Pool and Notifier spend their CPU under load: py-spy samples each
process while the gRPC trio serves a closed loop at concurrency 32 (the overhead scenario's
stack), then the one ``usher serve`` process while its HTTP gateway serves the same load
(Ollama's ``POST /api/generate``). Raw profiles land in
``bench/results/profile-<process>.txt``; the summary ranks functions by self and inclusive
share of the non-idle samples.

``python -m bench.profile_bench FILE...`` summarizes raw py-spy files again."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.load import Call, Trio, closed_loop, http_client, http_generate, stack_pids
from bench.overhead_bench import stack_config
from bench.stats import RESULTS, relative
from usher.testing.stack import LocalStack

PROFILE_RATE = 100
CONCURRENCY = 32
SECONDS = 10

_LINE = re.compile(r":\d+\)$")

#: Leaf frame of a sample taken while the (asyncio) event loop waits for I/O. Under uvloop
#: the loop is C code: its waits and its own work both show as ``Runner.run``.
IDLE_LEAF = "EpollSelector.select "
#: Frames left out of the inclusive ranking: process start-up and the event loop itself.
PLUMBING = (
    "runpy>",
    "asyncio/runners.py",
    "asyncio/base_events.py",
    "asyncio/events.py",
    "__main__.py",
    "threading.py",
    "run_service (usher/server.py)",
    "usher/eventloop.py",
)


@dataclass
class Profile:
    samples: int
    idle_samples: int
    self_top: list[tuple[str, float]]
    inclusive_top: list[tuple[str, float]]


def summarize_collapsed(path: Path, top: int = 12) -> Profile:
    """Self and inclusive shares per function from py-spy's raw (collapsed) output."""
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_LINE.sub(")", frame) for frame in stack.split(";")]
        if frames[-1].startswith(IDLE_LEAF):
            idle += n  # the event loop waiting for I/O: not work
            continue
        total += n
        self_time[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    # Frames nearly every stack shares (the module, the event loop) say nothing.
    boring = {f for f in inclusive if any(part in f for part in PLUMBING)}

    def share(counter: collections.Counter[str], skip: set[str]) -> list[tuple[str, float]]:
        return [
            (f, round(100 * n / max(1, total), 1))
            for f, n in counter.most_common(top + len(skip))
            if f not in skip
        ][:top]

    return Profile(
        samples=total,
        idle_samples=idle,
        self_top=share(self_time, set()),
        inclusive_top=share(inclusive, boring),
    )


def _py_spy() -> str | None:
    """The py-spy binary (PATH or next to this Python)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return spy if Path(spy).exists() else None


async def _record(
    spy: str, call: Call, pids: dict[str, int], targets: dict[str, int]
) -> tuple[dict[str, Any], dict[str, Path]]:
    """py-spy on ``targets`` while ``call`` runs at CONCURRENCY: the load's figures and
    the raw profile of each target."""
    outputs = {name: RESULTS / f"profile-{name}.txt" for name in targets}
    await closed_loop(call, 8, 2.0)  # warm up
    load = asyncio.create_task(closed_loop(call, CONCURRENCY, SECONDS + 3, pids))
    await asyncio.sleep(1.5)
    spies = [
        await asyncio.create_subprocess_exec(
            spy,
            "record",
            "--nonblocking",
            "-r",
            str(PROFILE_RATE),
            "-d",
            str(SECONDS),
            "-f",
            "raw",
            "-o",
            str(outputs[name]),
            "--pid",
            str(pid),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for name, pid in targets.items()
    ]
    await asyncio.gather(*(s.wait() for s in spies))
    result = await load
    return {"concurrency": CONCURRENCY, **result.figures()}, outputs


async def run() -> dict[str, Any]:
    spy = _py_spy()
    if spy is None:
        return {"skipped": "py-spy not installed (pip install py-spy)"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    with LocalStack(dataclasses.replace(stack_config(), gateway=False)) as stack:
        pids = stack_pids(stack)
        trio = Trio(stack)
        trio_load, outputs = await _record(
            spy, trio, pids, {name: pids[name] for name in ("scheduler", "pool", "notifier")}
        )
        await trio.aclose()
    with LocalStack(stack_config(all_in_one=True)) as serve:
        pids = stack_pids(serve)
        async with http_client(CONCURRENCY) as http:
            call = http_generate(http, serve.gateway_url, with_token=True)
            serve_load, serve_outputs = await _record(spy, call, pids, {"serve": pids["serve"]})
    outputs.update(serve_outputs)
    processes: dict[str, Any] = {}
    for name, path in outputs.items():
        if not path.exists():
            processes[name] = {"missing": "py-spy wrote nothing (ptrace not permitted?)"}
            continue
        profile = summarize_collapsed(path)
        processes[name] = {
            "samples": profile.samples,
            "loop_idle_samples": profile.idle_samples,
            "top_self": [f"{pct}% {frame}" for frame, pct in profile.self_top],
            "top_inclusive": [f"{pct}% {frame}" for frame, pct in profile.inclusive_top],
            "raw": relative(path),
        }
    return {
        "load": trio_load,
        "serve_load": serve_load,
        "processes": processes,
        "note": f"py-spy --nonblocking, {PROFILE_RATE} Hz, {SECONDS} s, while the trio serves "
        "the load (3 samplers running); shares of non-idle samples; 'Thread.run' leaves are "
        "gRPC's C-core poller thread, 'Handle._run' self time is Cython (grpc) and C callbacks "
        "run by the loop; under uvloop the loop's waits and C work show as 'Runner.run'",
    }


def summarize(paths: Sequence[str]) -> None:
    """``python -m bench.profile_bench FILE...``: summarize py-spy raw profiles."""
    for path in paths:
        profile = summarize_collapsed(Path(path))
        print(path, profile.samples, f"idle {profile.idle_samples}")
        for frame, pct in profile.self_top:
            print(f"  self {pct:5.1f}% {frame}")
        for frame, pct in profile.inclusive_top:
            print(f"  incl {pct:5.1f}% {frame}")


if __name__ == "__main__":
    summarize(sys.argv[1:])
