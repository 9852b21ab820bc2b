"""``python -m bench [scenario ...]``: run benchmark scenarios (the suite when none is named).

Each scenario prints one JSON line, its summary; plots land in ``bench/results/`` and every
summary also in ``bench/results/summary.json`` (the latest of each scenario). A scenario that
fails prints ``{"scenario": …, "error": …}`` and the others still run; the exit status is 1.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import sys
import time
import traceback
from collections.abc import Callable, Coroutine
from typing import Any

from bench import (
    chaos_bench,
    eta_bench,
    fairness_bench,
    fleet_bench,
    overhead_bench,
    profile_bench,
    real_bench,
    routing_bench,
    scale_bench,
    scaleout_bench,
    streaming_bench,
    submit_bench,
    watchers_bench,
)
from bench.stats import RESULTS, emit, tidy

Scenario = Callable[[], Coroutine[Any, Any, dict[str, Any]]]

#: What ``make bench`` runs, in this order.
SUITE: dict[str, Scenario] = {
    "overhead": overhead_bench.run,
    "streaming": streaming_bench.run,
    "fleet": fleet_bench.run,
    "fairness": fairness_bench.run,
    "eta": eta_bench.run,
    "scale": scale_bench.run,
    "watchers": watchers_bench.run,
    "chaos": chaos_bench.run,
    "scaleout": scaleout_bench.run,
    "real": real_bench.run,
}
#: Run only when named.
EXTRAS: dict[str, Scenario] = {
    "profile": profile_bench.run,
    "routing": routing_bench.run,
    "submit": submit_bench.run,
}
#: Earlier scenario names → the scenario that now holds their figures.
ALIASES = {
    "e2e": "overhead",
    "gateway": "overhead",
    "notifier": "scale",
    "pool": "routing",
    "scheduler": "submit",
}
SCENARIOS = {**SUITE, **EXTRAS}
SUMMARY = RESULTS / "summary.json"


def _record(name: str, summary: dict[str, Any]) -> None:
    """Keep the latest summary of each scenario in results/summary.json."""
    try:
        everything = json.loads(SUMMARY.read_text())
    except (OSError, ValueError):
        everything = {}
    everything[name] = {
        "measured_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **tidy(summary),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    SUMMARY.write_text(json.dumps(everything, indent=2) + "\n")


def main() -> None:
    asked = sys.argv[1:] or list(SUITE)
    chosen = list(dict.fromkeys(ALIASES.get(name, name) for name in asked))
    unknown = [name for name in chosen if name not in SCENARIOS]
    if unknown:
        raise SystemExit(
            f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)} "
            f"(or the earlier names {list(ALIASES)})"
        )
    failed = False
    for name in chosen:
        began = time.perf_counter()
        summary: dict[str, Any]
        try:
            summary = asyncio.run(SCENARIOS[name]())
        except Exception as exc:
            traceback.print_exc()
            summary, failed = {"error": f"{type(exc).__name__}: {exc}"}, True
        summary["seconds"] = time.perf_counter() - began
        emit(name, **summary)
        _record(name, summary)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
